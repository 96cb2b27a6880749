"""The training loop every chapter reuses, from a small GPT on one CPU to DeepSpeed on many ranks.

One step: set the learning rate from the schedule, compute the loss on the next batch, then hand the
backward pass and the optimizer step to a `Stepper`. The plain stepper clips the global gradient norm and
steps AdamW; a DDP, FSDP or DeepSpeed run swaps in its own stepper and keeps the rest of the loop.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.arguments import positive_int
from course_lib.masks import IGNORE_INDEX
from course_lib.progress import progress as progress_bar

PRECISIONS = ("fp32", "bf16", "fp16")
Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    min_lr: float = 1e-4  # where the cosine decay ends
    warmup_steps: int = 0
    weight_decay: float = 0.1  # applied to matrices only (see make_optimizer)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0  # max global L2 norm of the gradients; None = no clipping
    eval_every: int = 0  # evaluate every N steps (and after the last); 0 = only after the last
    accumulation_steps: int = 1  # micro-batches whose gradients add up to one optimizer step
    precision: str = "fp32"  # "bf16" or "fp16": the forward pass runs under torch.autocast
    loss_scaling: bool = True  # fp16 only: scale the loss (torch.amp.GradScaler) so small gradients survive

    def __post_init__(self) -> None:
        positive_int("steps", self.steps)
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be an int in [0, steps={self.steps}], got {self.warmup_steps!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be a positive number or None, got {self.grad_clip!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"eval_every must be an int >= 0, got {self.eval_every!r}")
        if not isinstance(self.accumulation_steps, int) or self.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {self.accumulation_steps!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "fp16" and not self.loss_scaling:
            raise ValueError(
                "precision='fp16' needs loss_scaling=True: without a GradScaler small gradients underflow to 0"
            )


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup from lr/warmup_steps to lr over warmup_steps, then cosine decay to min_lr at the
    last step. Warmup keeps the first updates small while Adam's moment estimates are still noise."""
    if not isinstance(step, int) or not 0 <= step < config.steps:
        raise ValueError(f"step must be an int in [0, steps={config.steps}), got {step!r}")
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = config.steps - config.warmup_steps
    progress = (step - config.warmup_steps) / max(decay_steps - 1, 1)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups with weight decay on matrices (weights of Linear and Embedding layers) only: decaying
    biases and LayerNorm gains towards 0 would fight their role (a shift, a scale of 1) for no benefit. For any
    optimizer that takes groups (AdamW here, ZeroRedundancyOptimizer, DeepSpeed's engine)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW on `decay_groups`, with the config's learning rate and betas."""
    return torch.optim.AdamW(decay_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. Works for any model whose output has `.logits` (B, T, V): ours and
    `transformers`' causal language models alike. Low-precision logits (autocast) are promoted to fp32 for the
    softmax; fp64 stays fp64."""
    logits = model(x).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch], loss_fn: LossFn = lm_loss) -> float:
    """Mean loss over fixed batches, in eval mode (no dropout), restoring the mode it found."""
    if not batches:
        raise ValueError("batches must not be empty")
    was_training = model.training
    model.eval()
    loss = sum(loss_fn(model, x, y).item() for x, y in batches) / len(batches)
    model.train(was_training)
    return loss


class Stepper(Protocol):
    """The replaceable end of a step: backward, then update. Returns the gradient norm before clipping."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float: ...


class PlainStepper:
    """loss.backward(), clip the global gradient norm, optimizer.step(), zero the gradients. With a GradScaler
    (fp16) the loss is scaled up before backward and the gradients unscaled before clipping; the scaler skips
    a step whose gradients overflowed and lowers its scale."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        grad_clip: float | None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.model, self.optimizer, self.grad_clip, self.scaler = model, optimizer, grad_clip, scaler

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip is not None else float("inf")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """torch.autocast for "bf16"/"fp16" (matmuls in low precision, weights and reductions in fp32); nothing
    for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def target_count(y: torch.Tensor) -> int:
    """Positions that carry a loss: every target except IGNORE_INDEX (padding, unmasked BERT tokens)."""
    return int((y != IGNORE_INDEX).sum())


@dataclass
class History:
    """What happened at every step, and at every evaluation."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)


def train(
    model: nn.Module,
    batches: Iterator[Batch],
    config: TrainConfig,
    eval_batches: list[Batch] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    stepper: Stepper | None = None,
    loss_fn: LossFn = lm_loss,
    progress: bool = True,
    start_step: int = 0,
    stop_after: int | None = None,
) -> History:
    """Train for config.steps steps on `batches`, evaluating on `eval_batches`; returns the History.

    `optimizer` defaults to make_optimizer(model, config); its learning rate is set from lr_at every step.
    `stepper` defaults to PlainStepper (with a GradScaler for fp16): pass another to change how gradients
    are made and applied. With accumulation_steps = k each step draws k micro-batches and weights each one's
    mean loss by its share of the step's targets, so the gradient is the per-token mean over all k, even when
    the micro-batches hold different numbers of targets. `start_step` continues a run restored with
    load_checkpoint; `stop_after` ends it after that many steps (an interruption, for chapter 07).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not hasattr(batches, "__next__"):
        raise TypeError("batches must be an iterator of (x, y) batches, e.g. course_lib.data.random_batches(...)")
    optimizer = optimizer if optimizer is not None else make_optimizer(model, config)
    device_type = next(model.parameters()).device.type
    if stepper is None:
        scaler = torch.amp.GradScaler(device_type) if config.precision == "fp16" else None
        stepper = PlainStepper(model, optimizer, config.grad_clip, scaler)
    if not isinstance(start_step, int) or not 0 <= start_step < config.steps:
        raise ValueError(f"start_step must be an int in [0, steps={config.steps}), got {start_step!r}")
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be a positive int or None, got {stop_after!r}")
    end = config.steps if stop_after is None else min(config.steps, start_step + stop_after)
    history = History()
    model.train()
    bar = progress_bar(range(start_step, end), disable=not progress, desc="training", unit="step")
    for step in bar:
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(config.accumulation_steps)]
        counts = [target_count(y) for _, y in micro_batches]
        if sum(counts) == 0:
            raise ValueError(f"the batches of step {step} have no targets (every label is IGNORE_INDEX)")
        loss_value = 0.0
        for (x, y), count in zip(micro_batches, counts, strict=True):
            with autocast(config.precision, device_type):
                loss = loss_fn(model, x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}: lower lr or enable grad_clip")
            share = count / sum(counts)
            stepper.backward(loss * share)
            loss_value += loss.item() * share
        grad_norm = stepper.step()
        tokens_per_s = sum(y.numel() for _, y in micro_batches) / (time.perf_counter() - start)
        for name, value in (("step", step), ("loss", loss_value), ("lr", lr), ("grad_norm", grad_norm),
                            ("tokens_per_s", tokens_per_s)):  # fmt: skip
            getattr(history, name).append(value)
        last = step == config.steps - 1
        if eval_batches is not None and (last or (config.eval_every and (step + 1) % config.eval_every == 0)):
            history.eval_step.append(step + 1)
            history.eval_loss.append(evaluate(model, eval_batches, loss_fn))
        postfix = {"loss": f"{loss_value:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if history.eval_loss:
            postfix["val"] = f"{history.eval_loss[-1]:.3f}"
        bar.set_postfix(postfix, refresh=False)
    return history


def rng_states() -> dict:
    """The state of every random generator a run may draw from: torch's CPU generator, each CUDA device's and
    the MPS one where present (dropout on a GPU draws from those), Python's and NumPy's."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        states["mps"] = torch.mps.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what rng_states returned; an accelerator's generators wherever that accelerator is present."""
    torch.set_rng_state(states["torch"].cpu())  # generator states are CPU bytes, wherever the checkpoint was mapped
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        for device, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state.cpu(), device)
    if states.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"].cpu())


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    next_step: int,
    batches: object | None = None,
    stepper: PlainStepper | None = None,
) -> None:
    """Everything a run needs to continue exactly: weights, optimizer moments, the step (the learning-rate
    schedule is a function of it), the random generators (dropout draws from torch's), the data stream's
    position and the loss scale."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "next_step": next_step,
        "rng": rng_states(),
        "batches": batches.state_dict() if hasattr(batches, "state_dict") else None,
        "scaler": stepper.scaler.state_dict() if stepper is not None and stepper.scaler is not None else None,
    }
    torch.save(state, path)


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: object | None = None,
    stepper: PlainStepper | None = None,
    map_location: torch.device | str | None = None,
) -> int:
    """Restore what save_checkpoint saved into fresh objects; returns the step to pass as train(start_step=).
    `map_location`: where the saved tensors are loaded (a rank's own device: without it, a checkpoint written from
    cuda:0 lands on GPU 0 in every rank that reads it)."""
    state = torch.load(path, weights_only=False, map_location=map_location)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_states(state["rng"])
    if state["batches"] is not None:
        if not hasattr(batches, "load_state_dict"):
            raise ValueError("the checkpoint saved a data position: pass the batches (a RandomBatches) to restore it")
        batches.load_state_dict(state["batches"])
    if state["scaler"] is not None:
        if stepper is None or stepper.scaler is None:
            raise ValueError("the checkpoint saved a loss scale: pass a stepper with a GradScaler to restore it")
        stepper.scaler.load_state_dict(state["scaler"])
    return state["next_step"]
