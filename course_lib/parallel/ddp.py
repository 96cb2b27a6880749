"""Data parallelism: the chapter-05 GPT trained with DistributedDataParallel on a DistributedSampler's shards,
through the course's training loop.

Every rank holds the whole model and a different slice of each global batch. DDP all-reduces (averages) the
gradients during backward, bucket by bucket as they become ready, so every rank takes the same optimizer step
and the weights equal those of one process training on the whole batch. `--no-sync` trains without DDP (no
all-reduce): the negative control. `--profile` records a torch.profiler trace of one more step and reports when
each backward op and each all-reduce ran, to show the overlap.

Run: torchrun --nproc-per-node 2 -m course_lib.parallel.ddp --steps 8 --batch 8 [--no-sync] [--profile]
`single_process_run(args)` trains the same model on the same global batches in one process, for comparison.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from course_lib.data import shakespeare_corpus
from course_lib.device import seed_everything
from course_lib.measure import quiet_profile
from course_lib.model import GPT, GPTConfig
from course_lib.parallel.common import finish, init, save_result, save_tensors
from course_lib.tokenizer import CharTokenizer
from course_lib.train import TrainConfig, lm_loss, train

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="global batch: windows per step over all ranks")
    p.add_argument("--block", type=int, default=32, help="window length in characters")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="DDP gradient bucket size in MB")
    p.add_argument("--no-sync", action="store_true", help="no DDP, no all-reduce: each rank trains on its shard")
    p.add_argument("--profile", action="store_true", help="trace one extra step with torch.profiler")
    return p


def model_config(args: argparse.Namespace, vocab_size: int) -> GPTConfig:
    # bias=False: a key-projection bias has a zero gradient in exact arithmetic (softmax ignores a constant
    # added to every score), so its rounding noise, normalised by Adam, would decide its update
    return GPTConfig(vocab_size=vocab_size, block_size=args.block, n_layer=args.layers, n_head=args.heads,
                     n_embd=args.width, bias=False)  # fmt: skip


def dataset(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, int]:
    """steps × batch fixed windows of the training text (x, y) and the vocabulary size: one epoch exactly."""
    corpus = shakespeare_corpus()
    tokenizer = CharTokenizer.from_text(corpus.train, unknown="\N{REPLACEMENT CHARACTER}")
    ids = torch.tensor(tokenizer.encode(corpus.train[:400_000]), dtype=torch.long)
    n = args.steps * args.batch
    starts = torch.randint(len(ids) - args.block - 1, (n,), generator=torch.Generator().manual_seed(args.seed))
    x = torch.stack([ids[s : s + args.block] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + 1 + args.block] for s in starts.tolist()])
    return x, y, tokenizer.vocab_size


def shard_batches(x: torch.Tensor, y: torch.Tensor, args, rank: int, world: int) -> Iterator[tuple]:
    """This rank's part of every global batch: DistributedSampler shuffles the indices (same seed on every rank)
    and deals them out rank by rank, so step s of all ranks together covers the same windows as step s of one
    process with world=1."""
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must be divisible by the number of ranks {world}")
    sampler = DistributedSampler(range(len(x)), num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    indices, per_rank = list(sampler), args.batch // world
    for step in range(args.steps):
        chosen = torch.tensor(indices[step * per_rank : (step + 1) * per_rank])
        yield x[chosen], y[chosen]


def build(args: argparse.Namespace, vocab_size: int) -> GPT:
    seed_everything(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    return GPT(model_config(args, vocab_size)).to(DTYPES[args.dtype])


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup_steps=min(2, args.steps))


def single_process_run(args: argparse.Namespace) -> tuple[GPT, list[float]]:
    """The reference: one process, the whole global batch each step."""
    x, y, vocab_size = dataset(args)
    model = build(args, vocab_size)
    history = train(model, shard_batches(x, y, args, 0, 1), train_config(args), progress=False)
    return model, history.loss


def profile_one_step(model, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Forward + backward of one step under torch.profiler; the backward ops and all-reduces with their times
    (µs from the start of the step), in start order."""
    with quiet_profile() as prof:
        lm_loss(model, x, y).backward()
    events = [e for e in prof.events() if "evaluate_function" in e.name or "all_reduce" in e.name.lower()]
    start = min(e.time_range.start for e in prof.events())
    rows = [{"name": e.name, "kind": "all_reduce" if "all_reduce" in e.name.lower() else "backward",
             "start_us": e.time_range.start - start, "end_us": e.time_range.end - start} for e in events]  # fmt: skip
    return sorted(rows, key=lambda r: r["start_us"])


def main() -> None:
    args = parser().parse_args()
    me = init()
    x, y, vocab_size = dataset(args)
    model = build(args, vocab_size).to(me.device)
    wrapped = model if args.no_sync else DistributedDataParallel(model, bucket_cap_mb=args.bucket_mb)
    batches = ((bx.to(me.device), by.to(me.device)) for bx, by in shard_batches(x, y, args, me.rank, me.world))
    start = time.perf_counter()
    history = train(wrapped, batches, train_config(args), progress=False)
    seconds = time.perf_counter() - start
    result = {"rank": me.rank, "world": me.world, "local_loss": history.loss, "seconds": seconds,
              "step_s": [args.batch // me.world * args.block / rate for rate in history.tokens_per_s],
              "weights": save_tensors("weights", dict(model.state_dict()))}  # fmt: skip
    if not args.no_sync:
        result["buckets"] = wrapped._get_ddp_logging_data().get("num_buckets_reduced")
    if args.profile:
        bx, by = next(shard_batches(x, y, args, me.rank, me.world))
        result["trace"] = profile_one_step(wrapped, bx.to(me.device), by.to(me.device))
    if me.rank == 0:
        print(f"{args.steps} steps on {me.world} ranks in {seconds:.2f} s, last local loss {history.loss[-1]:.4f}")
    del wrapped, model, batches
    save_result(result)
    finish()


if __name__ == "__main__":
    main()
