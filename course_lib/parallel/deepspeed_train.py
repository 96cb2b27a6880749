"""The chapter-09 GPT trained by DeepSpeed's engine under ZeRO stage 0-3, through the course's training loop.

The config comes from `course_lib.ds_config` (validated before DeepSpeed sees it); `deepspeed.initialize` wraps
model and optimizer in an engine; the shared `train()` loop runs unchanged with an `EngineStepper` that hands
backward and step to the engine (which reduces, partitions, clips and updates as its ZeRO stage says). The run
can save a DeepSpeed checkpoint, which `zero_to_fp32` consolidates into one ordinary state dict.

Run: deepspeed --num_gpus 2 --module course_lib.parallel.deepspeed_train --zero-stage 2 [--save-checkpoint]
(or through course_lib.launch with launcher="deepspeed"; torchrun works too). The model, data and schedule are
`course_lib.parallel.ddp`'s, so `ddp.single_process_run` is the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from course_lib.device import pick_backend
from course_lib.ds_config import DeepSpeedSettings, build
from course_lib.measure import storage_bytes
from course_lib.parallel import ddp
from course_lib.parallel.common import finish, result_dir, save_result
from course_lib.train import make_optimizer, train


def parser() -> argparse.ArgumentParser:
    p = ddp.parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per rank per step")
    p.add_argument("--save-checkpoint", action="store_true")
    p.add_argument("--same-shard", action="store_true", help="every rank reads rank 0's shard: a wrong run")
    return p


class EngineStepper:
    """The course loop's Stepper for a DeepSpeed engine: the loop already weights each micro-batch's loss by its
    share of the step's targets, so the engine must not divide by the accumulation steps again."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")


def micro_batches(x, y, args, rank: int, world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's shard of every global batch, cut into --accumulation micro-batches."""
    for bx, by in ddp.shard_batches(x, y, args, rank, world):
        if len(bx) % args.accumulation:
            raise ValueError(f"--batch / ranks = {len(bx)} must split into --accumulation {args.accumulation} parts")
        yield from zip(bx.chunk(args.accumulation), by.chunk(args.accumulation), strict=True)


def held_bytes(engine) -> dict[str, int]:
    """Deduplicated bytes of this rank's parameters (ZeRO-3: its partitions) and optimizer state."""
    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return {"parameters": storage_bytes(params),
            "optimizer": storage_bytes(t for state in base.state.values() for t in state.values()
                                       if isinstance(t, torch.Tensor))}  # fmt: skip


def main() -> None:
    import deepspeed

    args = parser().parse_args()
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")  # DeepSpeed's, not ours
    deepspeed.init_distributed(dist_backend=pick_backend(), timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    x, y, vocab_size = ddp.dataset(args)
    model = ddp.build(args, vocab_size)
    config = ddp.train_config(args)
    if args.batch % (world * args.accumulation):
        raise ValueError(f"--batch {args.batch} must divide by ranks x --accumulation = {world * args.accumulation}")
    settings = DeepSpeedSettings(micro_batch=args.batch // world // args.accumulation, accumulation=args.accumulation,
                                 world_size=world, zero_stage=args.zero_stage, grad_clip=config.grad_clip, lr=config.lr,
                                 betas=config.betas, weight_decay=config.weight_decay)  # fmt: skip
    decay_groups = make_optimizer(model, config).param_groups  # weight decay on matrices only, as the reference
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in decay_groups]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=build(settings))
    start = time.perf_counter()
    shard = 0 if args.same_shard else rank
    history = train(engine, micro_batches(x, y, args, shard, world),
                    dataclasses.replace(config, accumulation_steps=args.accumulation), optimizer=optimizer,
                    stepper=EngineStepper(engine), progress=False)  # fmt: skip
    result = {"rank": rank, "world": world, "zero_stage": args.zero_stage, "local_loss": history.loss,
              "seconds": time.perf_counter() - start, "held_bytes": held_bytes(engine),
              "optimizer_class": type(optimizer).__name__}  # fmt: skip
    if args.save_checkpoint:
        folder = result_dir() / "deepspeed-checkpoint"
        engine.save_checkpoint(str(folder), tag="final")
        result["checkpoint"] = str(folder)
    if rank == 0:
        print(
            f"ZeRO-{args.zero_stage} on {world} ranks: {args.steps} steps in {result['seconds']:.2f} s, "
            f"optimizer {result['optimizer_class']}, last local loss {history.loss[-1]:.4f}"
        )
    del engine, optimizer, model
    save_result(result)
    finish()


if __name__ == "__main__":
    main()
