"""The training loop on the chapter-05 model in fp32, bf16 and fp16 autocast, each with and without activation
checkpointing, side by side: tokens per second and the activation bytes saved for backward.

Each setting trains the chapter-05 recipe from the same start on the same batches for --steps steps (the first
--warmup steps are not timed) through `course_lib.train.train`, and measures the bytes autograd saves in one
forward pass with `course_lib.measure.saved_activation_bytes`. Timings are printed, never asserted.
Run: `.venv/bin/python benchmarks/precision_and_checkpointing.py [--steps 60] [--batch 12]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from course_lib.data import random_batches, shakespeare_corpus
from course_lib.device import seed_everything
from course_lib.measure import saved_activation_bytes
from course_lib.model import GPT
from course_lib.recipes import CHAPTER05
from course_lib.tokenizer import CharTokenizer
from course_lib.train import autocast, lm_loss, train


def measure(data: torch.Tensor, vocab_size: int, precision: str, checkpointing: bool, steps: int, warmup: int,
            batch: int) -> tuple[float, int, float]:  # fmt: skip
    """(median tokens/s after warm-up, activation bytes saved by one forward pass, final training loss)."""
    seed_everything(0)
    model = GPT(CHAPTER05.model_config(vocab_size))
    model.gradient_checkpointing = checkpointing
    x, y = next(random_batches(data, batch, CHAPTER05.block_size, seed=1))
    with autocast(precision, "cpu"):
        _, saved = saved_activation_bytes(lambda: lm_loss(model, x, y), exclude=model.parameters())
    config = dataclasses.replace(CHAPTER05.train_config(steps=steps), precision=precision)
    history = train(model, random_batches(data, batch, CHAPTER05.block_size, seed=0), config, progress=False)
    return statistics.median(history.tokens_per_s[warmup:]), saved, history.loss[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=CHAPTER05.batch_size)
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be in [0, --steps)")

    corpus = shakespeare_corpus()
    tokenizer = CharTokenizer.from_text(corpus.train, unknown="\N{REPLACEMENT CHARACTER}")
    data = torch.tensor(tokenizer.encode(corpus.train), dtype=torch.uint8)
    print(f"chapter-05 model ({CHAPTER05.n_layer} layers, width {CHAPTER05.n_embd}), batch {args.batch} x "
          f"{CHAPTER05.block_size} tokens, {args.steps} steps each, {torch.get_num_threads()} torch threads")
    header = ("precision", "checkpointing", "tokens/s", "activations", "vs fp32", "final loss")
    print("{:9} {:>13} {:>9} {:>12} {:>8} {:>10}".format(*header))
    baseline = None
    for precision in ("fp32", "bf16", "fp16"):
        for checkpointing in (False, True):
            rate, saved, loss = measure(data, tokenizer.vocab_size, precision, checkpointing, args.steps, args.warmup,
                                        args.batch)  # fmt: skip
            baseline = baseline or (rate, saved)
            print(f"{precision:9} {'on' if checkpointing else 'off':>13} {rate:9,.0f} {saved / 2**20:8.2f} MiB "
                  f"{saved / baseline[1]:7.0%} {loss:10.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
