"""Chapter 05's training recipe against nanoGPT's CPU recipe, side by side, for the same wall-clock time.

nanoGPT's well-known CPU run (4 layers, 4 heads, 128 wide, context 64, batch 12, dropout 0, 2000 steps,
lr 1e-3 -> 1e-4, 100 warmup steps) is trained here with our model and loop on our corpus; its wall time sets
the budget. The chapter's recipe then gets as many steps as fit in that budget (measured with a short
probe), and both report wall time, tokens/s and the validation loss in bits per character on the same
validation text. Timings are printed, never asserted. Run: `.venv/bin/python benchmarks/train_gpt.py`.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch

from course_lib.data import eval_batches, random_batches, shakespeare_corpus
from course_lib.device import seed_everything
from course_lib.model import GPT
from course_lib.recipes import CHAPTER05, Recipe
from course_lib.tokenizer import CharTokenizer
from course_lib.train import TrainConfig, evaluate, train

NANOGPT_CPU = Recipe(
    n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, lr=1e-3, min_lr=1e-4, warmup_steps=100,
    betas=(0.9, 0.99), steps=2000,
)  # fmt: skip
EVAL_TOKENS = 65_536  # validation tokens scored per model


@dataclass
class Result:
    name: str
    steps: int
    seconds: float
    tokens_per_s: float
    val_bpc: float


def run(name: str, recipe: Recipe, steps: int, data: torch.Tensor, val: torch.Tensor, vocab: int) -> Result:
    seed_everything(0)
    model = GPT(recipe.model_config(vocab))
    config = recipe.train_config(steps)
    batches = random_batches(data, recipe.batch_size, recipe.block_size, seed=0)
    start = time.perf_counter()
    history = train(model, batches, config, progress=False)
    seconds = time.perf_counter() - start
    n_eval = max(1, EVAL_TOKENS // (recipe.batch_size * recipe.block_size))
    loss = evaluate(model, eval_batches(val, recipe.batch_size, recipe.block_size, n_eval))
    tokens = len(history.step) * recipe.batch_size * recipe.block_size
    return Result(name, steps, seconds, tokens / seconds, loss / math.log(2))


def probe_step_seconds(recipe: Recipe, data: torch.Tensor, vocab: int, steps: int = 15) -> float:
    model = GPT(recipe.model_config(vocab))
    batches = random_batches(data, recipe.batch_size, recipe.block_size, seed=1)
    train(model, batches, TrainConfig(steps=3), progress=False)  # warm up allocators and kernels
    start = time.perf_counter()
    train(model, batches, TrainConfig(steps=steps), progress=False)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-steps", type=int, default=NANOGPT_CPU.steps)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    corpus = shakespeare_corpus()
    tokenizer = CharTokenizer.from_text(corpus.train, unknown="\N{REPLACEMENT CHARACTER}")
    data = torch.tensor(tokenizer.encode(corpus.train), dtype=torch.uint8)
    val = torch.tensor(tokenizer.encode(corpus.val), dtype=torch.uint8)

    reference = run("nanoGPT CPU recipe", NANOGPT_CPU, args.reference_steps, data, val, tokenizer.vocab_size)
    per_step = probe_step_seconds(CHAPTER05, data, tokenizer.vocab_size)
    steps = max(1, int(reference.seconds / per_step))
    ours = run("chapter 05 recipe", CHAPTER05, steps, data, val, tokenizer.vocab_size)

    print(f"torch threads: {torch.get_num_threads()}; validation: {len(val):,} characters, {EVAL_TOKENS:,} scored")
    print(f"{'recipe':<22} {'shape (L/H/d, T, B)':<22} {'steps':>6} {'wall s':>7} {'tokens/s':>9} {'val bpc':>8}")
    for result, recipe in ((reference, NANOGPT_CPU), (ours, CHAPTER05)):
        shape = f"{recipe.n_layer}/{recipe.n_head}/{recipe.n_embd}, {recipe.block_size}, {recipe.batch_size}"
        print(f"{result.name:<22} {shape:<22} {result.steps:>6} {result.seconds:>7.1f} "
              f"{result.tokens_per_s:>9,.0f} {result.val_bpc:>8.3f}")  # fmt: skip
    print(
        f"difference in validation bits per character: {reference.val_bpc - ours.val_bpc:+.3f} (positive: ours lower)"
    )


if __name__ == "__main__":
    main()
