"""ZeRO: data parallelism without keeping every state on every rank, measured per rank.

`--mode ddp`: plain DDP, every rank holds all parameters, gradients and AdamW states (the baseline).
`--mode zero1`: DDP + `ZeroRedundancyOptimizer`, ZeRO stage 1: each rank keeps the AdamW states (and does the
update) only for the parameters it owns, then broadcasts them.
`--mode fsdp`: FSDP2 `fully_shard` on every block and the root, ZeRO stage 3: parameters, gradients and
optimizer states are all sharded; a layer's full weights are all-gathered just before it runs and freed after.
Each rank reports the bytes it holds, counted as the deduplicated storage of its local tensors, and the model's
final weights; with `--checkpoint` the FSDP run also saves a sharded torch.distributed.checkpoint that a single
process can load.

Run: torchrun --nproc-per-node 2 -m course_lib.parallel.zero --mode fsdp [--checkpoint]
The model, data and schedule are `course_lib.parallel.ddp`'s, so `ddp.single_process_run` is the reference.
"""

from __future__ import annotations

import argparse

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from course_lib.measure import storage_bytes
from course_lib.parallel import ddp
from course_lib.parallel.common import finish, init, local, result_dir, save_result, save_tensors
from course_lib.train import decay_groups, lm_loss, make_optimizer, train

MODES = ("ddp", "zero1", "fsdp")


def parser() -> argparse.ArgumentParser:
    p = ddp.parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument("--mode", choices=MODES, default="fsdp")
    p.add_argument("--checkpoint", action="store_true", help="fsdp: save a sharded checkpoint (DCP)")
    p.add_argument("--same-shard", action="store_true", help="every rank reads rank 0's shard (no sampler): wrong")
    return p


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards all-gathered, or the tensor itself."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    states = optimizer.optim.state if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer.state
    return {
        "parameters": storage_bytes(local(p) for p in model.parameters()),
        "gradients": storage_bytes(local(p.grad) for p in model.parameters() if p.grad is not None),
        "optimizer": storage_bytes(local(t) for state in states.values() for t in state.values()),
    }


def main() -> None:
    args = parser().parse_args()
    if args.no_sync or args.profile:
        raise ValueError("--no-sync and --profile belong to course_lib.parallel.ddp")
    me = init()
    x, y, vocab_size = ddp.dataset(args)
    model = ddp.build(args, vocab_size)
    config = ddp.train_config(args)
    if args.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        wrapped = model
    else:
        wrapped = DistributedDataParallel(model, bucket_cap_mb=args.bucket_mb)
    if args.mode == "zero1":  # AdamW on the reference's groups, its state split over the ranks
        optimizer = ZeroRedundancyOptimizer(decay_groups(model, config.weight_decay), optimizer_class=torch.optim.AdamW,
                                            lr=config.lr, betas=config.betas)  # fmt: skip
    else:
        optimizer = make_optimizer(model, config)  # AdamW, weight decay on matrices only, as the reference run
    shard = 0 if args.same_shard else me.rank  # the negative control: the sampler forgotten, all read shard 0
    history = train(wrapped, ddp.shard_batches(x, y, args, shard, me.world), config, optimizer=optimizer,
                    progress=False)  # fmt: skip
    bx, by = next(ddp.shard_batches(x, y, args, me.rank, me.world))
    lm_loss(wrapped, bx, by).backward()  # one more backward, so that the gradients exist to be measured
    held = held_bytes(model, optimizer)
    optimizer.zero_grad()
    full = {name: full_tensor(p) for name, p in model.named_parameters()}  # all-gathered: every rank gets all
    result = {"rank": me.rank, "world": me.world, "mode": args.mode, "held_bytes": held, "local_loss": history.loss,
              "n_params": sum(p.numel() for p in full.values()), "weights": save_tensors("weights", full)}  # fmt: skip
    if args.mode == "zero1":
        owned = [p for group in optimizer.optim.param_groups for p in group["params"]]
        result["owned_numel"], result["owned_tensors"] = sum(p.numel() for p in owned), len(owned)
    if args.mode == "fsdp":
        result["local_numel"] = [local(p).numel() for p in model.parameters()]
        if args.checkpoint:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            path = result_dir() / "fsdp-checkpoint"
            dcp.save(get_model_state_dict(model), checkpoint_id=str(path))
            result["checkpoint"] = str(path)
    del wrapped, model, optimizer
    save_result(result)
    finish()


if __name__ == "__main__":
    main()
