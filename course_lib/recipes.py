"""Training recipes shared by a chapter and a benchmark, so the benchmark measures what the chapter runs."""

from __future__ import annotations

from dataclasses import dataclass

from course_lib.model import GPTConfig
from course_lib.train import TrainConfig


@dataclass(frozen=True)
class Recipe:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    lr: float
    min_lr: float
    warmup_steps: int
    steps: int
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd)  # fmt: skip

    def train_config(self, steps: int | None = None, eval_every: int = 0) -> TrainConfig:
        """The TrainConfig of this recipe, for `steps` steps (default: the recipe's own)."""
        steps = self.steps if steps is None else steps
        return TrainConfig(steps=steps, lr=self.lr, min_lr=self.min_lr, warmup_steps=min(self.warmup_steps, steps),
                           weight_decay=self.weight_decay, betas=self.betas, grad_clip=self.grad_clip,
                           eval_every=eval_every)  # fmt: skip


# Chapter 05: the character-level GPT trained on the course corpus. On two CPU cores, optimizer steps matter more
# than tokens per step: small batches and a shallow model take many fast steps, and a high peak learning rate with
# warmup, cosine decay and clipping makes them count (benchmarks/train_gpt.py compares it with nanoGPT's recipe).
CHAPTER05 = Recipe(n_layer=3, n_head=4, n_embd=128, block_size=64, batch_size=12, lr=3e-3, min_lr=3e-4,
                   warmup_steps=100, steps=4000)  # fmt: skip
