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
import statistics
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
from course_lib.train import decay_groups, train


def parser() -> argparse.ArgumentParser:
    p = ddp.parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per rank per step")
    p.add_argument("--save-checkpoint", action="store_true")
    p.add_argument("--same-shard", action="store_true", help="every rank reads rank 0's shard: a wrong run")
    p.add_argument("--bucket-elements", type=int, default=None, help="ZeRO bucket size (DeepSpeed's default: 5e8)")
    p.add_argument("--sweep", action="store_true", help="run every ZeRO stage x accumulation (2 and 4 too)")
    return p


class EngineStepper:
    """The course loop's Stepper for a DeepSpeed engine. DeepSpeed expects backward() then step() after *every*
    micro-batch and applies the update only at its accumulation boundary (every gradient_accumulation_steps
    calls), so both happen in `backward`; `step` reports the gradient norm of the update just made. The loop
    already weights each micro-batch's loss by its share of the targets, so the engine must not divide by the
    accumulation steps again."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self) -> float:
        if not self.engine.was_step_applied():
            raise RuntimeError("the loop's step and DeepSpeed's accumulation boundary disagree: check accumulation")
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")


def micro_batches(x, y, args, rank: int, world: int, accumulation: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's shard of every global batch, cut into `accumulation` micro-batches."""
    for bx, by in ddp.shard_batches(x, y, args, rank, world):
        if len(bx) % accumulation:
            raise ValueError(f"--batch / ranks = {len(bx)} must split into {accumulation} micro-batches")
        yield from zip(bx.chunk(accumulation), by.chunk(accumulation), strict=True)


def held_bytes(engine) -> dict[str, int]:
    """Deduplicated bytes of this rank's parameters (ZeRO-3: its partitions) and optimizer state."""
    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return {"parameters": storage_bytes(params),
            "optimizer": storage_bytes(t for state in base.state.values() for t in state.values()
                                       if isinstance(t, torch.Tensor))}  # fmt: skip


def run(args: argparse.Namespace, data: tuple, rank: int, world: int, zero_stage: int, accumulation: int) -> dict:
    """Build the model and engine for one setting, train args.steps steps, and report what happened."""
    import deepspeed

    x, y, vocab_size = data
    model = ddp.build(args, vocab_size)
    config = dataclasses.replace(ddp.train_config(args), accumulation_steps=accumulation)
    if args.batch % (world * accumulation):
        raise ValueError(f"--batch {args.batch} must divide by ranks x accumulation = {world * accumulation}")
    settings = DeepSpeedSettings(micro_batch=args.batch // world // accumulation, accumulation=accumulation,
                                 world_size=world, zero_stage=zero_stage, grad_clip=config.grad_clip, lr=config.lr,
                                 betas=config.betas, weight_decay=config.weight_decay,
                                 bucket_elements=args.bucket_elements)  # fmt: skip
    groups = decay_groups(model, config.weight_decay)  # weight decay on matrices only, as the reference
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=build(settings))
    shard = 0 if args.same_shard else rank
    batches = micro_batches(x, y, args, shard, world, accumulation)
    history = train(engine, batches, config, optimizer=optimizer, stepper=EngineStepper(engine), progress=False)
    result = {"zero_stage": zero_stage, "micro_batch": settings.micro_batch, "accumulation": accumulation,
              "local_loss": history.loss, "tokens_per_s": history.tokens_per_s, "held_bytes": held_bytes(engine),
              "optimizer_class": type(optimizer).__name__}  # fmt: skip
    if args.save_checkpoint:
        folder = result_dir() / f"deepspeed-checkpoint-zero{zero_stage}"
        engine.save_checkpoint(str(folder), tag="final")
        result["checkpoint"] = str(folder)
    engine.destroy()
    return result


def main() -> None:
    import deepspeed

    args = parser().parse_args()
    deprecated = ".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated"  # DeepSpeed's calls, not ours
    warnings.filterwarnings("ignore", message=deprecated)
    deepspeed.init_distributed(dist_backend=pick_backend(), timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    data = ddp.dataset(args)
    if args.sweep:  # every (ZeRO stage, accumulation) for the same global batch, in one launch
        settings = [(stage, acc) for stage in (0, 1, 2, 3) for acc in (1, 2, 4) if args.batch % (world * acc) == 0]
    else:
        settings = [(args.zero_stage, args.accumulation)]
    runs = []
    for stage, accumulation in settings:
        runs.append(run(args, data, rank, world, stage, accumulation))
        if rank == 0:
            done = runs[-1]
            print(f"ZeRO-{stage}, micro-batch {done['micro_batch']} x {accumulation} on {world} ranks: "
                  f"{statistics.median(done['tokens_per_s'][1:] or done['tokens_per_s']):,.0f} tokens/s per rank, "
                  f"{done['optimizer_class']}, last local loss {done['local_loss'][-1]:.4f}")  # fmt: skip
    save_result({"rank": rank, "world": world, "runs": runs} | (runs[0] if not args.sweep else {}))
    finish()


if __name__ == "__main__":
    main()
