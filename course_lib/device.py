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
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return torch.Generator().manual_seed(seed)
