"""The chapter-09 GPT trained by DeepSpeed's engine under ZeRO stage 0-3, through the course's training loop.

The config comes from `course_lib.ds_config` (validated before DeepSpeed sees it); `deepspeed.initialize` wraps
model and optimizer in an engine; the shared `train()` loop runs unchanged with an `EngineStepper` that hands
backward and step to the engine (which reduces, partitions, clips and updates as its ZeRO stage says). The run
can save a DeepSpeed checkpoint, which `consolidate` (DeepSpeed's `zero_to_fp32`) turns into one ordinary state dict.

The negative control of "equal to one process" is the classic data-parallel mistake: `--sum-gradients` multiplies
each rank's loss by the number of ranks, so the engine's average over ranks becomes a sum. Under AdamW that mistake
is nearly invisible (Adam's update m/(√v + ε) does not change when every gradient is multiplied by the same
constant, except through ε; clipping, when the norms exceed the threshold, rescales both to the same norm first),
so it is refuted with plain SGD (`--optimizer sgd`: no momentum, no weight decay, no clipping, an update exactly
lr × gradient). `--controls` runs, in one launch: AdamW summed (clipped, as the other runs), AdamW unclipped averaged
and summed, SGD averaged and summed.

Run: deepspeed --num_gpus 2 --module course_lib.parallel.deepspeed_train --zero-stage 2 [--save-checkpoint]
(or through course_lib.launch with launcher="deepspeed"; torchrun works too). The model, data and schedule are
`course_lib.parallel.ddp`'s (so is the SGD schedule), so `ddp.single_process_run(args, optimizer)` is the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import statistics
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from course_lib.device import pick_backend
from course_lib.ds_config import PRECISIONS, DeepSpeedSettings, build
from course_lib.measure import storage_bytes
from course_lib.parallel import ddp
from course_lib.parallel.common import finish, result_dir, save_result, save_tensors, this_rank_device
from course_lib.parallel.placement import place_each
from course_lib.train import decay_groups, train


def parser() -> argparse.ArgumentParser:
    p = ddp.parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per rank per step")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16 or fp16: DeepSpeed's mixed precision")
    p.add_argument("--save-checkpoint", action="store_true")
    p.add_argument("--same-shard", action="store_true", help="every rank reads rank 0's shard: a wrong run")
    p.add_argument("--bucket-elements", type=int, default=None, help="ZeRO bucket size (DeepSpeed's default: 5e8)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--sgd-lr", type=float, default=0.1, help="SGD's peak rate (0.5 diverges when summed)")
    p.add_argument("--sum-gradients", action="store_true", help="sum the ranks' gradients instead of averaging: wrong")
    p.add_argument("--no-clip", action="store_true", help="no gradient clipping (SGD never clips)")
    p.add_argument("--sweep", action="store_true", help="run every ZeRO stage x accumulation (2 and 4 too)")
    p.add_argument("--controls", action="store_true",
                   help="at --zero-stage: AdamW summed; AdamW unclipped and SGD, averaged and summed")  # fmt: skip
    return p


OPTIMIZER_NAMES = {"adamw": "AdamW", "sgd": "SGD"}  # torch's classes, which DeepSpeed's ZeRO optimizers wrap


class Setting(NamedTuple):
    zero_stage: int
    accumulation: int = 1
    optimizer: str = "adamw"
    sum_gradients: bool = False
    clip: bool = True  # clip the global gradient norm at 1 (AdamW only: the SGD control never clips)


def consolidate(checkpoint: str | Path, tag: str = "final") -> dict[str, torch.Tensor]:
    """The fp32 weights of a checkpoint saved by `engine.save_checkpoint`: under ZeRO 1-3 reassembled from every
    rank's partitions by DeepSpeed's zero_to_fp32, under stage 0 read from the one model file. zero_to_fp32 narrates
    with print() and a tqdm bar that nothing switches off (the checkpoint's absolute path among them), so its
    streams are captured here."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = Path(checkpoint)
    if not any((folder / tag).glob("*optim_states.pt")):  # stage 0: one ordinary model file, nothing to gather
        return torch.load(folder / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)


class EngineStepper:
    """The course loop's Stepper for a DeepSpeed engine. DeepSpeed expects backward() then step() after *every*
    micro-batch and applies the update only at its accumulation boundary (every gradient_accumulation_steps
    calls), so both happen in `backward`; `step` reports the gradient norm of the update just made. The loop
    already weights each micro-batch's loss by its share of the targets, so the engine must not divide by the
    accumulation steps again. `loss_factor` multiplies every loss: the world size turns the engine's average over
    ranks into a sum (the negative control)."""

    def __init__(self, engine, loss_factor: float = 1.0) -> None:
        self.engine, self.loss_factor = engine, loss_factor

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.loss_factor if self.loss_factor != 1 else loss, scale_wrt_gas=False)
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


def settled(args: argparse.Namespace, world: int) -> argparse.Namespace:
    """`args` with the global batch every setting trains on (a sweep keeps it and varies the accumulation); a
    ValueError if it cannot split over `world` ranks x --accumulation micro-batches."""
    return ddp.for_world(args, world, 1 if args.sweep else args.accumulation)


def check_world(args: argparse.Namespace, world: int) -> None:
    """Raise a ValueError if the batch cannot split over `world` ranks x --accumulation micro-batches."""
    settled(args, world)


def held_bytes(engine) -> dict[str, int]:
    """Deduplicated bytes of this rank's parameters (ZeRO-3: its partitions), optimizer state, and the fp32 copy
    of its partition that ZeRO's optimizer updates (stages 1-2: `single_partition_of_fp32_groups`, stage 3:
    `fp32_partitioned_groups_flat`), counted only where its storage is not the parameters' own."""
    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    copies = [*getattr(engine.optimizer, "single_partition_of_fp32_groups", []),
              *getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])]  # fmt: skip
    return {"parameters": storage_bytes(params),
            "optimizer": storage_bytes(t for state in base.state.values() for t in state.values()
                                       if isinstance(t, torch.Tensor)),
            "fp32_copy": storage_bytes([*params, *copies]) - storage_bytes(params)}  # fmt: skip


def run(args: argparse.Namespace, data: tuple, rank: int, world: int, setting: Setting,
        save_weights: bool = False) -> dict:  # fmt: skip
    """Build the model and engine for one setting, train args.steps steps, and report what happened."""
    import deepspeed

    x, y, vocab_size = data
    stage, accumulation = setting.zero_stage, setting.accumulation
    model = ddp.build(args, vocab_size)
    config = dataclasses.replace(ddp.train_config(args, setting.optimizer), accumulation_steps=accumulation)
    if not setting.clip:
        config = dataclasses.replace(config, grad_clip=None)
    args = ddp.for_world(args, world, accumulation)  # the global batch is fixed; it must split evenly
    settings = DeepSpeedSettings(micro_batch=args.batch // (world * accumulation), accumulation=accumulation,
                                 precision=args.precision, world_size=world, zero_stage=stage,
                                 grad_clip=config.grad_clip, lr=config.lr,
                                 optimizer=setting.optimizer, betas=config.betas, weight_decay=config.weight_decay,
                                 bucket_elements=args.bucket_elements)  # fmt: skip
    groups = decay_groups(model, config.weight_decay)  # weight decay on matrices only, as the reference
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=build(settings))
    shard = 0 if args.same_shard else rank
    # on the device the engine put the model on
    batches = place_each(micro_batches(x, y, args, shard, world, accumulation), engine.device)
    stepper = EngineStepper(engine, loss_factor=world if setting.sum_gradients else 1.0)
    history = train(engine, batches, config, optimizer=optimizer, stepper=stepper, progress=False)
    result = setting._asdict() | {
        "micro_batch": engine.train_micro_batch_size_per_gpu(), "engine_zero_stage": engine.zero_optimization_stage(),
        "engine_accumulation": engine.gradient_accumulation_steps(), "local_loss": history.loss,
        "grad_norm": history.grad_norm, "tokens_per_s": history.tokens_per_s, "held_bytes": held_bytes(engine),
        "optimizer_class": type(optimizer).__name__}  # fmt: skip
    label = (f"zero{stage}-acc{accumulation}-{setting.optimizer}" + ("-summed" if setting.sum_gradients else "")
             + ("" if setting.clip else "-unclipped"))  # fmt: skip
    if save_weights:  # stages 0-2 keep the whole model on every rank
        if stage == 3:
            raise ValueError("ZeRO-3 ranks hold partitions only: save a checkpoint and consolidate it instead")
        result["weights"] = save_tensors(label, dict(engine.module.state_dict()))
    if args.save_checkpoint:
        folder = result_dir() / f"deepspeed-checkpoint-{label}"
        engine.save_checkpoint(str(folder), tag="final")
        result["checkpoint"] = str(folder)
    engine.destroy()
    return result


class _CollectWarnings(logging.Filter):
    """Keeps DeepSpeed's log records (as messages for the result) instead of printing them with a timestamp."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() not in self.messages:
            self.messages.append(record.getMessage())
        return False


def main() -> None:
    import deepspeed
    from deepspeed.utils import logger

    args = parser().parse_args()
    deprecated = ".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated"  # DeepSpeed's calls, not ours
    warnings.filterwarnings("ignore", message=deprecated)
    logged = _CollectWarnings()
    logger.addFilter(logged)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints that its shared-memory op was built, every time
        deepspeed.init_distributed(dist_backend=pick_backend(this_rank_device()), timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    args = settled(args, world)
    data = ddp.dataset(args)
    if args.sweep:  # every (ZeRO stage, accumulation) for the same global batch, in one launch
        settings = [Setting(stage, acc, args.optimizer, args.sum_gradients, not args.no_clip) for stage in (0, 1, 2, 3)
                    for acc in (1, 2, 4) if args.batch % (world * acc) == 0]  # fmt: skip
    elif args.controls:
        settings = [Setting(args.zero_stage, args.accumulation, "adamw", sum_gradients=True)] + [
            Setting(args.zero_stage, args.accumulation, optimizer, summed, clip=False)
            for optimizer in ("adamw", "sgd") for summed in (False, True)]  # fmt: skip
    else:
        settings = [Setting(args.zero_stage, args.accumulation, args.optimizer, args.sum_gradients, not args.no_clip)]
    runs = []
    for setting in settings:
        runs.append(run(args, data, rank, world, setting, save_weights=args.controls))
        if rank == 0:
            done, name = runs[-1], OPTIMIZER_NAMES[setting.optimizer]
            wrapper = "" if done["optimizer_class"] == name else f" in {done['optimizer_class']}"
            print(f"ZeRO-{setting.zero_stage}, micro-batch {done['micro_batch']}, accumulation {setting.accumulation}, "
                  f"{world} ranks: {statistics.median(done['tokens_per_s'][1:] or done['tokens_per_s']):,.0f} "
                  f"tokens/s per rank, {name}{wrapper}" + ("" if setting.clip else ", unclipped")
                  + (", gradients summed" if setting.sum_gradients else "")
                  + f", rank 0's last loss {done['local_loss'][-1]:.4f}")  # fmt: skip
    several = args.sweep or args.controls
    save_result({"rank": rank, "world": world, "runs": runs, "deepspeed_log": logged.messages}
                | (runs[0] if not several else {}))  # fmt: skip
    finish()


if __name__ == "__main__":
    main()
