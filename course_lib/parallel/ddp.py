"""Data parallelism: the chapter-05 GPT trained with DistributedDataParallel on a DistributedSampler's shards,
through the course's training loop.

Every rank holds the whole model and a different slice of each global batch. DDP all-reduces (averages) the
gradients during backward, bucket by bucket as they become ready, so every rank takes the same optimizer step
and the weights equal those of one process training on the whole batch. Two negative controls: `--no-sync` trains
without DDP (no all-reduce), `--sum-gradients` all-reduces without dividing by the number of ranks (a summed
gradient, N times the mean). `--optimizer sgd` trains with plain SGD, whose step is exactly lr × gradient, so a
summed gradient shows; AdamW's step m/(√v + ε) barely changes when every gradient is scaled by the same factor.
`--profile` records a torch.profiler trace of one more step: when each backward op ran, when each bucket's
all-reduce was launched and when it ran.

Run: torchrun --nproc-per-node 2 -m course_lib.parallel.ddp --steps 8 --micro-batch 4 [--optimizer sgd]
     [--no-sync | --sum-gradients] [--profile]
`single_process_run(args, optimizer)` trains the same model on the same global batches in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from course_lib.data import shakespeare_corpus
from course_lib.device import seed_everything
from course_lib.measure import quiet_profile
from course_lib.model import GPT, GPTConfig
from course_lib.parallel.common import Rank, finish, init, save_result, save_tensors
from course_lib.parallel.placement import place, place_each
from course_lib.tokenizer import CharTokenizer
from course_lib.train import TrainConfig, decay_groups, lm_loss, train

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_MICRO_BATCH = 4  # windows per rank: 8 a step on the course's 2 ranks, 64 on a cluster's 2 x 8
OPTIMIZERS = ("adamw", "sgd")


def parser(controls: bool = False) -> argparse.ArgumentParser:
    """The options every data-parallel entry point shares (model, data, schedule). `controls` adds the optimizer
    choice and the summed-gradient negative control, which the DDP and ZeRO entry points take (DeepSpeed's defines
    its own, with the same names)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=None,
                   help=f"windows per rank per micro-batch (default {DEFAULT_MICRO_BATCH}): the global batch is "
                        "micro-batch x accumulation x ranks, valid for any number of ranks")
    p.add_argument("--batch", type=int, default=None,
                   help="the global batch instead (windows per step, all ranks): must divide by ranks x accumulation")
    p.add_argument("--block", type=int, default=32, help="window length in characters")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--bucket-mb", type=float, default=None,
                   help="DDP gradient bucket cap in MiB (default: DDP's own, 25 MiB with a first bucket of 1 MiB)")
    p.add_argument("--no-sync", action="store_true", help="no DDP, no all-reduce: each rank trains on its shard")
    p.add_argument("--profile", action="store_true", help="trace one extra step with torch.profiler")
    if controls:
        p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
        p.add_argument("--sgd-lr", type=float, default=0.5, help="the peak learning rate of --optimizer sgd")
        p.add_argument("--sum-gradients", action="store_true", help="sum the ranks' gradients, not average: wrong")
    return p


def for_world(args: argparse.Namespace, world: int, accumulation: int = 1) -> argparse.Namespace:
    """`args` with the global batch settled for `world` ranks that each accumulate `accumulation` micro-batches a
    step: `--batch` if given (it must split evenly), else micro-batch x accumulation x world. The result holds the
    global batch only (micro_batch None: it is --batch / (world x accumulation)), so settling twice changes nothing.
    Raises a ValueError naming the arguments when the batch cannot split, before any rank has started."""
    for name, value in (("world", world), ("accumulation", accumulation)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for flag, value in (("--batch", args.batch), ("--micro-batch", args.micro_batch)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    split = world * accumulation
    if args.batch is None:
        batch = (args.micro_batch or DEFAULT_MICRO_BATCH) * split
    elif args.batch % split:
        raise ValueError(f"--batch {args.batch} (global) does not split over {world} ranks x {accumulation} "
                         f"micro-batches: give the per-rank --micro-batch instead, or a --batch divisible by {split}")
    elif args.micro_batch is not None and args.micro_batch * split != args.batch:
        raise ValueError(f"--batch {args.batch} and --micro-batch {args.micro_batch} disagree on {world} ranks x "
                         f"{accumulation} micro-batches: give one of them")  # fmt: skip
    else:
        batch = args.batch
    return argparse.Namespace(**vars(args) | {"batch": batch, "micro_batch": None})  # settled: --batch says it all


def check_world(args: argparse.Namespace, world: int) -> None:
    """Raise a ValueError if these arguments cannot run on `world` ranks (the dry run of a cluster job asks)."""
    for_world(args, world)


def _global_batch(args: argparse.Namespace) -> int:
    if args.batch is None:
        raise ValueError("args.batch is not settled: pass the arguments through ddp.for_world(args, world) first")
    return args.batch


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
    n = args.steps * _global_batch(args)
    starts = torch.randint(len(ids) - args.block - 1, (n,), generator=torch.Generator().manual_seed(args.seed))
    x = torch.stack([ids[s : s + args.block] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + 1 + args.block] for s in starts.tolist()])
    return x, y, tokenizer.vocab_size


def shard_batches(x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, rank: int, world: int) -> Iterator[tuple]:
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


def train_config(args: argparse.Namespace, optimizer: str = "adamw") -> TrainConfig:
    """AdamW's schedule, clipped at norm 1. For SGD its own rate (`--sgd-lr`), no weight decay and no clipping:
    clipping would scale a summed gradient back to the averaged one's norm, so an update is exactly lr × gradient."""
    config = TrainConfig(steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup_steps=min(2, args.steps))
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "sgd":
        return dataclasses.replace(config, lr=args.sgd_lr, min_lr=args.sgd_lr / 10, weight_decay=0.0, grad_clip=None)
    return config


def make_optimizer(model: torch.nn.Module, config: TrainConfig, optimizer: str = "adamw",
                   sharded: bool = False) -> torch.optim.Optimizer:  # fmt: skip
    """AdamW with weight decay on the matrices (`train.decay_groups`), or plain SGD (no momentum, no decay). With
    `sharded`, a ZeroRedundancyOptimizer: each rank keeps the state of, and updates, only the parameters it owns."""
    if optimizer == "sgd":
        cls, params, options = torch.optim.SGD, list(model.parameters()), {"lr": config.lr}
    else:
        cls, params = torch.optim.AdamW, decay_groups(model, config.weight_decay)
        options = {"lr": config.lr, "betas": config.betas}
    if not sharded:
        return cls(params, **options)
    from torch.distributed.optim import ZeroRedundancyOptimizer  # imported here: it pulls in FSDP, a second to load

    return ZeroRedundancyOptimizer(params, optimizer_class=cls, **options)


def single_process_run(args: argparse.Namespace, optimizer: str = "adamw", ranks: int = 2) -> tuple[GPT, list[float]]:
    """The reference: one process, the whole global batch each step, for the run on `ranks` ranks with these
    arguments (its global batch is --batch, or --micro-batch x ranks)."""
    args = for_world(args, ranks)
    x, y, vocab_size = dataset(args)
    model = build(args, vocab_size)
    config = train_config(args, optimizer)
    history = train(model, shard_batches(x, y, args, 0, 1), config, optimizer=make_optimizer(model, config, optimizer),
                    progress=False)  # fmt: skip
    return model, history.loss


def summed_allreduce_hook(state, bucket):  # unannotated: DDP inspects the annotations, which are strings here
    """The bug `--sum-gradients` plants: all-reduce (sum) a bucket of gradients (a dist.GradBucket) and forget to
    divide by the number of ranks. Without a hook, DDP divides each gradient by N as it copies it into the bucket;
    with one, the hook must divide (as torch's `allreduce_hook` does). Returns the future of the bucket's summed
    tensor, as a DDP communication hook must."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda done: done.value()[0])


def wrap(model: torch.nn.Module, args: argparse.Namespace) -> DistributedDataParallel:
    """The model in DDP with buckets of `--bucket-mb` MiB (None: DDP's default, 25 MiB, the first bucket 1 MiB);
    with `--sum-gradients` the buckets are summed."""
    wrapped = DistributedDataParallel(model, bucket_cap_mb=args.bucket_mb)
    if args.sum_gradients:
        wrapped.register_comm_hook(None, summed_allreduce_hook)
    return wrapped


def buckets(wrapped: DistributedDataParallel) -> dict:
    """What DDP logged about its buckets: the order in which the gradients became ready in the last step, the
    buckets it rebuilt in that order after the first step (parameter indices into model.parameters(), and bytes),
    the cap it filled them to, and how many it reduced in the last step."""
    logged = wrapped._get_ddp_logging_data()
    indices = [[int(i) for i in b.split()] for b in logged["rebuilt_per_bucket_param_indices"].split(",")]
    return {"ready_order": [int(i) for i in logged["prev_iteration_grad_ready_order_indices"].split(",")],
            "params": indices, "bytes": [int(b) for b in logged["rebuilt_bucket_sizes"].split(",")],
            "cap_bytes": logged["bucket_cap_bytes"], "reduced": logged["num_buckets_reduced"]}  # fmt: skip


def event_kind(name: str) -> str | None:
    """What a profiler event is in a DDP step: a backward op (autograd's evaluate_function), the launch of a
    bucket's all-reduce (c10d::allreduce_, on the training thread), the all-reduce itself (gloo:all_reduce, run by
    a gloo thread; nccl:all_reduce on GPUs), or nothing of interest."""
    if "evaluate_function" in name:
        return "backward"
    if name == "c10d::allreduce_":
        return "launch"
    return "all_reduce" if ":all_reduce" in name else None


def profile_one_step(model, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Forward + backward of one step under torch.profiler; the backward ops, the launches of the all-reduces and
    the all-reduces with their times (µs from the start of the step), in start order."""
    with quiet_profile() as prof:
        lm_loss(model, x, y).backward()
    start = min(e.time_range.start for e in prof.events())
    rows = [{"name": e.name, "kind": event_kind(e.name), "start_us": e.time_range.start - start,
             "end_us": e.time_range.end - start} for e in prof.events() if event_kind(e.name)]  # fmt: skip
    return sorted(rows, key=lambda r: r["start_us"])


def run(args: argparse.Namespace, me: Rank) -> dict:
    """Train this rank's shards (under DDP unless --no-sync); losses, step times, weights, buckets, trace."""
    if args.no_sync and args.sum_gradients:
        raise ValueError("--no-sync and --sum-gradients exclude each other: without DDP nothing is summed")
    args = for_world(args, me.world)
    x, y, vocab_size = dataset(args)
    model = place(build(args, vocab_size), me.device)
    wrapped = model if args.no_sync else wrap(model, args)
    batches = place_each(shard_batches(x, y, args, me.rank, me.world), me.device)
    config = train_config(args, args.optimizer)
    start = time.perf_counter()
    history = train(wrapped, batches, config, optimizer=make_optimizer(model, config, args.optimizer), progress=False)
    seconds = time.perf_counter() - start
    step_s = [args.batch // me.world * args.block / rate for rate in history.tokens_per_s]
    weights = save_tensors("weights", dict(model.state_dict()))
    result = {"rank": me.rank, "world": me.world, "local_loss": history.loss, "grad_norm": history.grad_norm,
              "seconds": seconds, "step_s": step_s, "weights": weights}  # fmt: skip
    if not args.no_sync and args.steps > 1:  # DDP rebuilds its buckets after the first step
        result["buckets"] = buckets(wrapped)
    if args.profile:
        bx, by = place(next(shard_batches(x, y, args, me.rank, me.world)), me.device)
        dist.barrier()  # both ranks start the traced step together
        result["trace"] = profile_one_step(wrapped, bx, by)
    if me.rank == 0:
        print(f"{args.steps} steps on {me.world} ranks in {seconds:.2f} s, last local loss {history.loss[-1]:.4f}")
    return result


def main() -> None:
    args = parser(controls=True).parse_args()
    save_result(run(args, init()))
    finish()

if __name__ == "__main__":
    main()
