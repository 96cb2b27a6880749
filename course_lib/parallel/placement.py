"""Put what a rank computes with on the rank's device, in one place.

On a GPU node every rank owns one GPU (`Rank.device`, cuda:LOCAL_RANK) and NCCL reduces CUDA tensors only; a model,
a batch or a tensor left on the CPU fails at its first collective, or as soon as it meets a GPU tensor. Entry
points build everything on the CPU (the same seed gives the same weights whatever the device) and then pass it
through `place`, the one helper every entry point's `run()` uses; the placement test runs each entry point with a
rank device that is not the CPU, so a forgotten `place` fails there too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")


def place(thing: T, device: torch.device) -> T:
    """`thing` on `device`: a module (moved in place, returned), a tensor, or a tuple, list or dict of them (each
    element placed); anything else (ints, strings, None) unchanged."""
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device (a Rank's .device), got {device!r}")
    if isinstance(thing, nn.Module):
        return thing.to(device)
    if isinstance(thing, torch.Tensor):
        return thing.to(device)
    if isinstance(thing, tuple) and hasattr(thing, "_fields"):  # a named tuple takes its fields one by one
        return type(thing)(*(place(item, device) for item in thing))
    if isinstance(thing, (tuple, list)):
        return type(thing)(place(item, device) for item in thing)
    if isinstance(thing, dict):
        return {key: place(value, device) for key, value in thing.items()}
    return thing


def place_each(things: Iterable[T], device: torch.device) -> Iterator[T]:
    """Every item of a stream (batches of (x, y), say) placed as it is drawn."""
    for thing in things:
        yield place(thing, device)
