"""What every distributed entry point shares: joining the process group, writing results, leaving cleanly.

- `init` gives the rank its device (GPU LOCAL_RANK of its node, or the CPU; never Apple's MPS) and joins with the
  backend for it (gloo on CPU, NCCL on GPUs) and a short timeout, so a rank whose peer died fails in seconds instead
  of gloo's default 30 minutes. What the rank computes with goes onto that device with `placement.place`.
- `save_result` writes `rank{r}.json` (and `save_tensors` a `.pt`) into the folder the launcher gives.
- `finish` ends the run in the order that avoids DDP's abort at exit ("terminate called without an active
  exception"): collect garbage (the caller has dropped its model and optimizer), wait for every rank, then
  destroy the process group.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from course_lib.device import pick_backend, rank_device
from course_lib.launch import PREFIX_RANK_ENV, RANKS_ON_CPU_ENV, RESULT_DIR_ENV


class _RankPrefixed:
    """A text stream that starts every line with torchrun's "[default{rank}]:" tag, so the launcher can tell the
    ranks apart under launchers that do not tag lines themselves (DeepSpeed's)."""

    def __init__(self, stream, rank: str) -> None:
        self.stream, self.tag, self.at_line_start = stream, f"[default{rank}]:", True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            self.stream.write((self.tag if self.at_line_start else "") + piece)
            self.at_line_start = piece.endswith("\n")
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


if os.environ.get(PREFIX_RANK_ENV) == "1" and "RANK" in os.environ:
    sys.stdout = _RankPrefixed(sys.stdout, os.environ["RANK"])
    sys.stderr = _RankPrefixed(sys.stderr, os.environ["RANK"])


BACKEND_HINT = (
    "What to try: on one machine, start the ranks with course_lib.launch.launch, which pins the rendezvous and gloo to "
    "the loopback interface (MASTER_ADDR=127.0.0.1; GLOO_SOCKET_IFNAME=lo on Linux, lo0 on macOS) and sets "
    "USE_LIBUV=0 on Windows; with torchrun, set those yourself. On a cluster, check that MASTER_ADDR resolves and "
    "its port is open from every node, and for NCCL run with NCCL_DEBUG=INFO and set NCCL_SOCKET_IFNAME to the "
    "interface the nodes share."
)


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    device: torch.device
    attempt: int  # 0, then 1, 2, ... after each elastic restart by torchrun (--max-restarts)


def this_rank_device() -> torch.device:
    """cuda:LOCAL_RANK, or the CPU when there is no GPU or the course's launcher started more ranks on this machine
    than it has GPUs (it then sets COURSE_RANKS_ON_CPU); never Apple's MPS."""
    if os.environ.get(RANKS_ON_CPU_ENV) == "1":
        return torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK", "0")
    if not local_rank.isdigit():
        raise ValueError(f"LOCAL_RANK must be a rank number set by the launcher, got {local_rank!r}")
    return rank_device(int(local_rank))


def init(timeout_s: float = 60.0) -> Rank:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment)."""
    if "RANK" not in os.environ:
        raise RuntimeError("not started by torchrun: use `torchrun --nproc-per-node N -m <module>` or launch()")
    device = this_rank_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # After an elastic restart torchrun's store still holds the previous attempt's addresses; a prefix per attempt
    # keeps a restarted rank from dialling a rank that no longer exists.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun hosts the store itself
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    backend = pick_backend(device)
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=not agent_store and rank == 0, timeout=timeout,
                              use_libuv=os.environ.get("USE_LIBUV", "1") == "1")  # fmt: skip
        dist.init_process_group(backend, store=dist.PrefixStore(f"attempt{attempt}", store), rank=rank,
                                world_size=world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)  # NCCL bound to its GPU now
    except (RuntimeError, ValueError) as error:
        raise RuntimeError(f"rank {rank} could not start {backend} at {os.environ['MASTER_ADDR']}:"
                           f"{os.environ['MASTER_PORT']}: {error}\n{BACKEND_HINT}") from error  # fmt: skip
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return Rank(dist.get_rank(), dist.get_world_size(), device, attempt)


def result_dir() -> Path:
    if RESULT_DIR_ENV not in os.environ:
        raise RuntimeError(f"{RESULT_DIR_ENV} is not set: start the entry point with course_lib.launch.launch")
    return Path(os.environ[RESULT_DIR_ENV])


def save_result(result: dict) -> None:
    """This rank's results as rank{r}.json, written whole or not at all (the launcher reads them after exit), with
    the backend the rank really used."""
    path = result_dir() / f"rank{dist.get_rank()}.json"
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"backend": dist.get_backend()} | result))
    partial.replace(path)


def save_tensors(name: str, tensors: dict[str, torch.Tensor]) -> str:
    """Tensors too big for JSON (weights to compare), saved as rank{r}-{name}.pt; returns the path to report."""
    path = result_dir() / f"rank{dist.get_rank()}-{name}.pt"
    plain = {}
    for key, value in tensors.items():
        value = value.detach().cpu()
        plain[key] = value.wait() if hasattr(value, "wait") else value  # a collective's output: wait for the data
    torch.save(plain, path)
    return str(path)


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this rank stores: a DTensor's local shard (FSDP2, tensor parallel), or the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def finish() -> None:
    """Leave the process group without the exit-time abort. Drop models and optimizers before calling."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
