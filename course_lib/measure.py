"""Measuring memory and compute, so every formula of chapters 07, 08 and 12 is checked against the real thing.

Three instruments, each counting something different:
- `storage_bytes`: the bytes behind a set of tensors, each storage counted once (a view or a tied weight
  shares its storage; "bytes per rank" in the distributed chapters means exactly this).
- `saved_activation_bytes` (and `saved_bytes_by_dtype`): what autograd keeps from the forward pass for the
  backward pass, seen through `torch.autograd.graph.saved_tensors_hooks` (parameters excluded: they are stored
  anyway).
- `net_allocated_bytes`: what the profiler saw allocated and not freed while a function ran. tracemalloc cannot
  see tensor memory, and a process's resident memory (RSS) counts everything the allocator keeps for the whole
  process, so on a CPU this is the honest "memory held afterwards" of one call.
And `matmul_flops_per_s`, the peak a model's FLOP rate is compared with (MFU), `cpu_has_16bit_matmul`, whether
that peak can be reached in bf16 or fp16 at all, and `last_level_cache_bytes`, the size a buffer must exceed for a
timing to measure main memory rather than the cache.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

from course_lib.arguments import positive_int

T = TypeVar("T")


def _storages(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    storages = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors must be torch.Tensors, got {type(t).__name__}")
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return storages


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`: views and shared (tied) tensors are counted once."""
    return sum(_storages(tensors).values())


def saved_bytes_by_dtype(fn: Callable[[], T], exclude: Iterable[torch.Tensor] = ()) -> tuple[T, dict[torch.dtype, int]]:
    """Run fn() and return (its result, the distinct bytes autograd saved for backward, by dtype). Under autocast
    the split shows which saved tensors are 16-bit and which stayed fp32 (or int64, for token ids)."""
    excluded = set(_storages(exclude))
    saved: dict[int, tuple[torch.dtype, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = (t.dtype, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    by_dtype: dict[torch.dtype, int] = {}
    for dtype, nbytes in saved.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return result, by_dtype


def saved_activation_bytes(fn: Callable[[], T], exclude: Iterable[torch.Tensor] = ()) -> tuple[T, int]:
    """Run fn() and return (its result, the distinct bytes autograd saved for backward while it ran). Pass the
    model's parameters as `exclude`: a Linear saves its weight too, but that memory is the parameters'."""
    result, by_dtype = saved_bytes_by_dtype(fn, exclude)
    return result, sum(by_dtype.values())


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def quiet_profile(**kwargs) -> Iterator[profile]:
    """torch.profiler.profile(activities=[CPU], **kwargs) whose C++ side does not log "profiler_start" and
    "profiler_stop" lines into the output (file descriptor 2 is silenced while it starts and stops)."""
    prof = profile(activities=[ProfilerActivity.CPU], **kwargs)
    with _quiet_stderr():
        prof.start()
    try:
        yield prof
    finally:
        with _quiet_stderr():
            prof.stop()


def net_allocated_bytes(fn: Callable[[], T]) -> tuple[T, int]:
    """Run fn() under torch.profiler(profile_memory=True) and return (its result, bytes allocated minus bytes
    freed meanwhile): for a forward pass whose result is kept, the activations it left for backward."""
    with quiet_profile(profile_memory=True) as prof:
        result = fn()
    return result, int(sum(event.self_cpu_memory_usage for event in prof.events()))


def matmul_flops_per_s(size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """The best FLOP rate of a (size x size) @ (size x size) matmul over `repeats` runs (2·size³ FLOPs each):
    what this machine can do at best, the denominator of model FLOPs utilisation."""
    positive_int("size", size)
    positive_int("repeats", repeats)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm up: first-call costs are not the machine's speed
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def cpu_has_16bit_matmul(dtype: torch.dtype) -> bool:
    """Whether oneDNN, the CPU math library PyTorch calls, has a matmul kernel in `dtype` (bfloat16 or float16) for
    this CPU: PyTorch's own check (it also keeps very small matrices off oneDNN). bf16 needs AVX-512 (BW, VL, DQ) or
    AVX-NE-CONVERT, fp16 AVX512-FP16 or AVX-NE-CONVERT. Without a kernel PyTorch multiplies 16-bit matrices in a
    generic loop, many times slower than fp32, so any 16-bit speed-up on a CPU starts with this answer."""
    checks = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
    if dtype not in checks:
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype!r}")
    check = getattr(torch.ops.mkldnn, checks[dtype], None)  # private ops: absent from builds without oneDNN
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


def _cache_size(text: str) -> int:
    """'107520K' (as Linux writes a cache size) -> bytes."""
    text = text.strip()
    if text and text[-1].upper() in _UNITS:
        return int(text[:-1]) * _UNITS[text[-1].upper()]
    return int(text)


def last_level_cache_bytes(caches: Path = CPU_CACHES) -> int | None:
    """The size of the CPU's last-level cache (the largest level Linux lists for cpu0), or None where the system
    does not say (no /sys, as on macOS). A buffer timed to measure memory bandwidth must be larger than this,
    or the timing measures the cache."""
    levels = {}
    for index in sorted(caches.glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            levels[int((index / "level").read_text())] = _cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
    return levels[max(levels)] if levels else None
