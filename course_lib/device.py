"""Pick where tensors live and how processes talk, and make runs repeatable.

Every notebook calls these instead of hard-coding "cpu", so the same notebook uses a GPU when one is
there and the same distributed entry point uses NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

DEVICE_KINDS = ("cuda", "mps", "cpu")
DETERMINISTIC_CUBLAS_WORKSPACE = ":4096:8"  # what torch.use_deterministic_algorithms asks for on CUDA >= 10.2


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return True


def _kind(name: str, value: torch.device | str) -> str:
    """The device type of `value` ("cuda" for "cuda:1"), or a ValueError naming the argument."""
    try:
        kind = torch.device(value).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in DEVICE_KINDS:
        raise ValueError(f"{name} must be a device of kind {DEVICE_KINDS}, got {value!r}")
    return kind


def pick_device(prefer: str | None = None) -> torch.device:
    """The best device here: cuda, then mps, then cpu; `prefer` asks for one kind and fails loudly if
    it is missing, rather than quietly running a GPU lesson on the CPU."""
    if prefer is None:
        return torch.device(next(kind for kind in DEVICE_KINDS if _available(kind)))
    kind = _kind("prefer", prefer)
    if not _available(kind):
        raise ValueError(f"prefer={prefer!r} was asked for, but no {kind} device is available here")
    return torch.device(prefer)


def rank_device(local_rank: int) -> torch.device:
    """The device of a distributed rank: GPU number `local_rank` of its node when CUDA is there, else the CPU.
    Never Apple's MPS: gloo cannot reduce MPS tensors and MPS has no float64, so on a Mac the ranks run on the CPU
    (the single-process chapters may still use MPS through `pick_device`)."""
    if not isinstance(local_rank, int) or isinstance(local_rank, bool) or local_rank < 0:
        raise ValueError(f"local_rank must be an int >= 0, got {local_rank!r}")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"local_rank {local_rank} has no GPU: this process sees {torch.cuda.device_count()} "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most "
                         "one rank per GPU, and let each node's launcher see all of the node's GPUs")  # fmt: skip
    return torch.device("cuda", local_rank)


def pick_backend(device: torch.device | str | None = None) -> str:
    """The torch.distributed backend for `device`: NCCL for CUDA, gloo for everything else (gloo is
    the one that runs on CPU; NCCL needs GPUs)."""
    kind = _kind("device", device) if device is not None else pick_device().type
    return "nccl" if kind == "cuda" else "gloo"


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and every GPU) so a notebook prints the same numbers each run.

    Returns a torch.Generator seeded the same way, for code that wants its own stream of randomness.
    `deterministic=True` also asks torch for deterministic kernels where it has them.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ["PYTHONHASHSEED"] = str(seed)  # for subprocesses this process starts
    if deterministic:  # cuBLAS is deterministic only with a fixed workspace; read when CUDA first runs a matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC_CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return torch.Generator().manual_seed(seed)
