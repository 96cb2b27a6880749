"""Elastic training: chapter 09's DDP run that survives losing a rank, because it checkpoints and resumes.

On a cluster a machine dies now and then. `torchrun --max-restarts K` notices a dead rank, stops the others and
starts them all again (K times at most); the run itself must then carry on from where it was, not from step 0.
This entry point saves a checkpoint (weights, AdamW moments, the next step) every `--checkpoint-every` steps
and, when started, resumes from the latest one. `--kill-rank R --kill-at-step S` SIGKILLs rank R just before
step S in the first attempt only (a lost machine). The steps after the last checkpoint are lost and done again;
because the data stream is a function of the step, the finished run equals one that was never interrupted.
`--forget-data-position` resumes the weights but restarts the data stream: the negative control.

Run: torchrun --nproc-per-node 2 --max-restarts 1 -m course_lib.parallel.elastic --checkpoint-dir DIR
     --kill-rank 1 --kill-at-step 5
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
from pathlib import Path

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from course_lib.parallel import ddp
from course_lib.parallel.common import Rank, finish, init, save_result, save_tensors
from course_lib.parallel.placement import place, place_each
from course_lib.train import load_checkpoint, make_optimizer, save_checkpoint, train

CHECKPOINT = "checkpoint.pt"

check_world = ddp.check_world  # which worlds the arguments run on: the batch must split, as for DDP


def parser() -> argparse.ArgumentParser:
    p = ddp.parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument("--checkpoint-dir", type=Path, required=True)
    p.add_argument("--checkpoint-every", type=int, default=2, help="steps between checkpoints")
    p.add_argument("--kill-rank", type=int, default=None, help="the rank lost in the first attempt")
    p.add_argument("--kill-at-step", type=int, default=None, help="the step before which it is lost")
    p.add_argument("--forget-data-position", action="store_true", help="resume the weights, restart the data")
    return p


def run(args: argparse.Namespace, me: Rank) -> dict:
    """Train from the latest checkpoint (or step 0) to args.steps, checkpointing on the way; losses and weights."""
    args = ddp.for_world(args, me.world)
    x, y, vocab_size = ddp.dataset(args)
    model = place(ddp.build(args, vocab_size), me.device)
    config = ddp.train_config(args)
    optimizer = make_optimizer(model, config)
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)  # a fresh job's folder, or the one it resumes from
    checkpoint = args.checkpoint_dir / CHECKPOINT
    start = load_checkpoint(checkpoint, model, optimizer, map_location=me.device) if checkpoint.is_file() else 0
    wrapped = DistributedDataParallel(model)
    skip = 0 if args.forget_data_position else start  # the data stream is a function of the step: skip to it
    shards = itertools.islice(ddp.shard_batches(x, y, args, me.rank, me.world), skip, None)
    batches = place_each(shards, me.device)
    if me.rank == 0:
        print(f"attempt {me.attempt}: starting at step {start}" + (" (from the checkpoint)" if start else ""))
    losses = []
    for step in range(start, args.steps):
        if me.attempt == 0 and me.rank == args.kill_rank and step == args.kill_at_step:
            print(f"rank {me.rank} is lost before step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        losses += train(wrapped, batches, config, optimizer=optimizer, progress=False, start_step=step,
                        stop_after=1).loss  # fmt: skip
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            if me.rank == 0:  # DDP keeps the ranks identical: one copy is enough; written whole or not at all
                save_checkpoint(checkpoint.with_suffix(".partial"), model, optimizer, step + 1)
                checkpoint.with_suffix(".partial").replace(checkpoint)
            dist.barrier()  # nobody runs ahead of a checkpoint that is not yet on disk
    return {"rank": me.rank, "attempt": me.attempt, "started_at": start, "steps_run": len(losses),
            "local_loss": losses, "weights": save_tensors("weights", dict(model.state_dict()))}


def main() -> None:
    args = parser().parse_args()
    save_result(run(args, init()))
    finish()

if __name__ == "__main__":
    main()
