"""Run a distributed entry point as real processes from a notebook, and get each rank's results back.

`mp.spawn` cannot start a function defined in a notebook (it is not importable), and `!torchrun` that fails
does not fail the cell. `launch` starts `torchrun` (or DeepSpeed's launcher) as a subprocess with a time limit,
streams every rank's output into the cell prefixed by its rank, and returns the `rank{r}.json` each rank wrote
(with `course_lib.parallel.common.save_result`) as a list indexed by rank. If a rank crashes or the run exceeds
its time limit, every process is killed and a `LaunchError` shows the failing rank's traceback. `nnodes > 1`
starts one launcher per "node" on this machine, joined as a cluster's nodes would be (torchrun's c10d
rendezvous; DeepSpeed's `--no_ssh --node_rank` with a hostfile); `max_restarts` lets torchrun restart the ranks
after a failure (elastic training).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from course_lib.arguments import positive_int

RESULT_DIR_ENV = "COURSE_RESULT_DIR"  # where an entry point writes rank{r}.json and any tensors it saves
RANKS_ON_CPU_ENV = "COURSE_RANKS_ON_CPU"  # "1": more ranks than GPUs here, so the ranks compute on the CPU (gloo)
PREFIX_RANK_ENV = "COURSE_PREFIX_RANK"  # "1": the ranks tag their own lines (launchers that do not, DeepSpeed's)
LAUNCHERS = ("torchrun", "deepspeed")
EXTENSIONS_DIR = Path(__file__).resolve().parents[1] / ".torch_extensions"  # DeepSpeed's compiled ops (make setup)
RANK_LINE = re.compile(r"^\[default(\d+)\]:(.*)$")  # torchrun --tee prefixes each rank's lines like this
TAIL_LINES = 40  # lines of a failing rank's output shown in the error
LOCAL_NODE_NAMES = ("localhost", "127.0.0.1")  # this machine under two names: one per "node" in a hostfile


class LaunchError(RuntimeError):
    """A launched run failed: a rank crashed, the run hung past its time limit, or results are missing.
    `exit_codes` holds the launchers' exit codes when they all exited (None when the run was stopped)."""

    def __init__(self, message: str, exit_codes: list[int] | None = None) -> None:
        super().__init__(message)
        self.exit_codes = exit_codes


def ranks_fit_on_gpus(ranks: int) -> bool:
    """Whether `ranks` processes on this machine can have a GPU each (NCCL cannot put two ranks on one GPU)."""
    import torch

    return torch.cuda.is_available() and ranks <= torch.cuda.device_count()


def deepspeed_accelerator(ranks: int = 1) -> str:
    """The accelerator DeepSpeed should use for `ranks` ranks on this machine, said explicitly (it warns when it has
    to guess): CUDA if each rank gets a GPU, else the CPU."""
    return "cuda" if ranks_fit_on_gpus(ranks) else "cpu"


PLATFORMS = ("linux", "darwin", "win32")  # sys.platform of Linux (tested in CI), macOS and Windows (best effort)
LOOPBACK_INTERFACE = {"linux": "lo", "darwin": "lo0"}


def local_rendezvous_env(platform: str = sys.platform) -> dict[str, str]:
    """The environment for ranks that all run on this machine, on `platform` (sys.platform): the rendezvous address
    and gloo's interface pinned to the loopback (on macOS gloo otherwise resolves the host name, which often fails),
    and, on Windows, TCPStore without libuv (torch's Windows builds lack it and torchrun asks for it)."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS} (a sys.platform), got {platform!r}")
    env = {"MASTER_ADDR": "127.0.0.1"}
    if platform in LOOPBACK_INTERFACE:
        env["GLOO_SOCKET_IFNAME"] = LOOPBACK_INTERFACE[platform]
    if platform == "win32":
        env["USE_LIBUV"] = "0"
    return env


def free_port() -> int:
    """A TCP port nobody listens on now (DeepSpeed's launcher would otherwise use 29500 for every run)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _commands(launcher: str, module: str, args: list[str], nproc: int, nnodes: int, max_restarts: int,
              scratch: Path) -> list[list[str]]:  # fmt: skip
    """One launcher command per node. A single node uses torchrun --standalone (it picks its own port)."""
    port = free_port()
    if launcher == "torchrun":
        common = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--tee=3",
                  f"--max-restarts={max_restarts}"]  # fmt: skip
        if nnodes == 1:
            return [[*common, "--standalone", f"--log-dir={scratch / 'logs'}", "-m", module, *args]]
        rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=course-{port}"]
        return [[*common, f"--nnodes={nnodes}", f"--node-rank={node}", *rendezvous,
                 f"--log-dir={scratch / f'logs{node}'}", "-m", module, *args] for node in range(nnodes)]  # fmt: skip
    common = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_addr",
              "127.0.0.1", "--master_port", str(port), "--no_local_rank"]  # fmt: skip
    if nnodes == 1:
        return [[*common, "--module", module, *args]]
    hostfile = scratch / "hostfile"  # the same machine under different names, one per "node"
    hostfile.write_text("".join(f"{name} slots={nproc}\n" for name in LOCAL_NODE_NAMES[:nnodes]))
    return [[*common, "--hostfile", str(hostfile), "--num_nodes", str(nnodes), "--no_ssh", "--node_rank", str(node),
             "--module", module, *args] for node in range(nnodes)]  # fmt: skip


def _check_args(module: str, nproc: int, timeout: float, threads_per_rank: int, launcher: str, nnodes: int,
                max_restarts: int) -> None:  # fmt: skip
    if not isinstance(module, str) or importlib.util.find_spec(module) is None:
        raise ValueError(f"module must name an importable entry point, e.g. 'course_lib.parallel.ddp', got {module!r}")
    for name, value in (("nproc", nproc), ("threads_per_rank", threads_per_rank), ("nnodes", nnodes)):
        positive_int(name, value)
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if launcher == "deepspeed" and nnodes > len(LOCAL_NODE_NAMES):
        raise ValueError(f"launcher='deepspeed' runs at most {len(LOCAL_NODE_NAMES)} nodes on one machine "
                         "(one hostfile alias each)")  # fmt: skip
    if not isinstance(max_restarts, int) or max_restarts < 0 or (max_restarts and launcher != "torchrun"):
        raise ValueError(f"max_restarts must be an int >= 0 (restarts need launcher='torchrun'), got {max_restarts!r}")


def _read_lines(node: int, stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put((node, line.rstrip("\n")))
    lines.put((node, None))  # end of this node's output


def _kill(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop a launcher and every rank it started. The ranks run in sessions of their own, so each is found as a
    descendant first; the launcher gets SIGTERM (it forwards it to its ranks), then anything still alive SIGKILL."""
    family = []
    with contextlib.suppress(psutil.NoSuchProcess):
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    if process.poll() is None:
        process.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for leftover in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    process.wait()


def _tail(rank_lines: dict[str, list[str]], other_lines: list[str]) -> str:
    shown = [f"[{who}] {line}" for who, lines in sorted(rank_lines.items()) for line in lines[-10:]]
    return "\n".join(shown + other_lines[-10:])


def _failure_report(rank_lines: dict[str, list[str]], other_lines: list[str]) -> str:
    failed = [who for who, lines in sorted(rank_lines.items()) if any("Traceback" in line for line in lines)]
    if not failed:
        return "no rank printed a traceback; the last output:\n" + _tail(rank_lines, other_lines)
    parts = []
    for who in failed:
        lines = rank_lines[who]
        start = max(i for i, line in enumerate(lines) if "Traceback" in line)
        parts.append(f"{who} failed:\n" + "\n".join(lines[max(start, len(lines) - TAIL_LINES) :]))
    return "\n".join(parts)


def launch(
    module: str,
    args: Sequence[str] = (),
    nproc: int = 2,
    timeout: float = 120.0,
    threads_per_rank: int = 1,
    result_dir: str | Path | None = None,
    show_output: bool = True,
    launcher: str = "torchrun",
    nnodes: int = 1,
    max_restarts: int = 0,
) -> list[dict]:
    """Run `module` with `nproc` ranks on each of `nnodes` nodes (this machine) and return the ranks' results.

    torchrun: `torchrun --standalone --nproc-per-node nproc -m module *args` (several nodes: c10d rendezvous);
    deepspeed: `deepspeed --num_gpus nproc --master_port <free> --module module *args` (several nodes: a
    hostfile and `--no_ssh --node_rank`). `timeout` bounds the whole run; `threads_per_rank` sets OMP_NUM_THREADS
    (2 ranks x 1 thread on 2 cores); `result_dir` keeps what the ranks write (default: a temporary folder).
    """
    _check_args(module, nproc, timeout, threads_per_rank, launcher, nnodes, max_restarts)
    args = [str(a) for a in args]
    with tempfile.TemporaryDirectory(prefix="course-launch-") as scratch:
        commands = _commands(launcher, module, args, nproc, nnodes, max_restarts, Path(scratch))
        by_node = nnodes > 1 and launcher == "torchrun"  # torchrun tags local ranks: several nodes repeat them
        return run_commands(commands, nproc * nnodes, module, timeout, threads_per_rank, result_dir, show_output,
                            ranks_tag_lines=launcher == "deepspeed", label_by_node=by_node)  # fmt: skip


def run_commands(
    commands: list[list[str]],
    world: int,
    name: str,
    timeout: float = 120.0,
    threads_per_rank: int = 1,
    result_dir: str | Path | None = None,
    show_output: bool = True,
    ranks_tag_lines: bool = True,
    label_by_node: bool = False,
    env: dict[str, str] | None = None,
) -> list[dict]:
    """Start the launcher `commands` together (one per node), stream the ranks' lines, return the `world` ranks'
    results. `ranks_tag_lines`: the ranks tag their own lines (launchers that do not, or `torchrun` without
    `--tee`); `label_by_node`: the tags are local ranks, told apart by which command printed them; `env` is added to
    the environment. The engine under `launch`, and under `course_lib.local_cluster` for a batch script."""
    with tempfile.TemporaryDirectory(prefix="course-run-") as scratch:
        results = Path(result_dir) if result_dir is not None else Path(scratch) / "results"
        results.mkdir(parents=True, exist_ok=True)
        for old in results.glob("rank*.json"):
            old.unlink()
        ours = {
            "OMP_NUM_THREADS": str(threads_per_rank),
            "PYTHONUNBUFFERED": "1",
            RESULT_DIR_ENV: str(results),
            PREFIX_RANK_ENV: str(int(ranks_tag_lines)),
        }
        platform_env = local_rendezvous_env(sys.platform) if sys.platform in PLATFORMS else {}
        env = platform_env | os.environ | (env or {}) | ours  # what the user set wins over the platform's defaults
        env.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))
        env.setdefault("DS_ACCELERATOR", deepspeed_accelerator(world))
        env[RANKS_ON_CPU_ENV] = "0" if ranks_fit_on_gpus(world) else "1"  # every rank started here is on this machine
        lines: queue.Queue = queue.Queue()
        processes = []
        for node, command in enumerate(commands):
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                       start_new_session=True)  # fmt: skip
            threading.Thread(target=_read_lines, args=(node, process.stdout, lines), daemon=True).start()
            processes.append(process)
        rank_lines: dict[str, list[str]] = {}
        other_lines: list[str] = []
        deadline, open_streams = time.monotonic() + timeout, len(processes)
        try:
            while open_streams:
                try:
                    node, line = lines.get(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
                except queue.Empty:
                    if time.monotonic() >= deadline:
                        raise LaunchError(f"{name} did not finish within {timeout:g} s and was stopped; "
                                          f"last output:\n{_tail(rank_lines, other_lines)}") from None  # fmt: skip
                    continue
                if line is None:
                    open_streams -= 1
                    continue
                match = RANK_LINE.match(line)
                if match:
                    who = f"node {node} rank {match.group(1)}" if label_by_node else f"rank {match.group(1)}"
                    rank_lines.setdefault(who, []).append(match.group(2))
                    if show_output:
                        print(f"[{who}] {match.group(2)}", flush=True)
                else:
                    other_lines.append(line)
            for process in processes:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            for process in processes:
                _kill(process)
            raise
        codes = [process.returncode for process in processes]
        if any(codes):
            raise LaunchError(f"{name} failed (exit codes {codes}).\n{_failure_report(rank_lines, other_lines)}", codes)
        missing = [r for r in range(world) if not (results / f"rank{r}.json").is_file()]
        if missing:
            raise LaunchError(f"{name} finished but ranks {missing} wrote no rank{{r}}.json into {RESULT_DIR_ENV}")
        return [json.loads((results / f"rank{r}.json").read_text()) for r in range(world)]
