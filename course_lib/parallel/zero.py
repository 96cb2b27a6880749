"""ZeRO: data parallelism without keeping every state on every rank, measured per rank.

`--mode ddp`: plain DDP, every rank holds all parameters, gradients and AdamW states (the baseline).
`--mode zero1`: DDP + `ZeroRedundancyOptimizer`, ZeRO stage 1: each rank keeps the AdamW states (and does the
update) only for the parameters it owns, then broadcasts them.
`--mode fsdp`: FSDP2 `fully_shard` on every block and the root, ZeRO stage 3: parameters, gradients and
optimizer states are all sharded; a layer's full weights are all-gathered just before it runs and freed after.
Each rank reports the bytes it holds, counted as the deduplicated storage of its local tensors, the collectives
it issued in one more training step (counted as they pass through PyTorch's dispatcher), and the model's final
weights; with `--checkpoint` the FSDP run also saves a sharded torch.distributed.checkpoint that a single process
can load. `--optimizer sgd` and `--sum-gradients` (the negative control: gradients summed over the ranks, not
averaged) are `course_lib.parallel.ddp`'s; `--skip-sync` (zero1, a negative control) keeps each owner's updated
parameters to itself, and `--same-shard` has every rank read the same data.

Run: torchrun --nproc-per-node 2 -m course_lib.parallel.zero --mode fsdp [--checkpoint]
The model, data and schedule are `course_lib.parallel.ddp`'s, so `ddp.single_process_run` is the reference.
"""

from __future__ import annotations

import argparse

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.utils._python_dispatch import TorchDispatchMode

from course_lib.measure import storage_bytes
from course_lib.parallel import ddp
from course_lib.parallel.common import Rank, finish, init, local, result_dir, save_result, save_tensors
from course_lib.parallel.placement import place, place_each
from course_lib.train import lm_loss, train

MODES = ("ddp", "zero1", "fsdp")

check_world = ddp.check_world  # which worlds the arguments run on: the batch must split, as for DDP


def parser() -> argparse.ArgumentParser:
    p = ddp.parser(controls=True)
    p.description = __doc__.splitlines()[0]
    p.add_argument("--mode", choices=MODES, default="fsdp")
    p.add_argument("--checkpoint", action="store_true", help="fsdp: save a sharded checkpoint (DCP)")
    p.add_argument("--same-shard", action="store_true", help="every rank reads rank 0's shard (no sampler): wrong")
    p.add_argument("--skip-sync", action="store_true",
                   help="zero1: owners do not broadcast their updated parameters, the others keep stale ones: wrong")
    return p


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards all-gathered, or the tensor itself."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


class CollectiveCounter(TorchDispatchMode):
    """Records every collective this rank issues while active: each passes through PyTorch's dispatcher as a c10d op
    (DDP's bucket all-reduces, ZeroRedundancyOptimizer's broadcasts and FSDP's all-gathers and reduce-scatters
    alike). Each is counted by the elements of its full tensor, as the ZeRO paper counts volume: an all-gather by
    the gathered output, a reduce-scatter by its input, an all-reduce or a broadcast by its tensor."""

    FULL_TENSOR = {"allreduce_": 0, "broadcast_": 0, "_allgather_base_": 0, "_reduce_scatter_base_": 1}  # argument

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            op = func.name().split("::")[1]
            full = args[self.FULL_TENSOR.get(op, 0)]
            tensor = full[0] if isinstance(full, (list, tuple)) else full
            self.calls.append({"op": op, "elements": tensor.numel(), "bytes": tensor.numel() * tensor.element_size()})
        return func(*args, **(kwargs or {}))


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    states = optimizer.optim.state if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer.state
    return {
        "parameters": storage_bytes(local(p) for p in model.parameters()),
        "gradients": storage_bytes(local(p.grad) for p in model.parameters() if p.grad is not None),
        "optimizer": storage_bytes(local(t) for state in states.values() for t in state.values()),
    }


def run(args: argparse.Namespace, me: Rank) -> dict:
    """Train under the mode, then one more step with its collectives counted; bytes held, weights, and (fsdp) the
    checkpoint."""
    if args.no_sync or args.profile:
        raise ValueError("--no-sync and --profile belong to course_lib.parallel.ddp")
    args = ddp.for_world(args, me.world)
    x, y, vocab_size = ddp.dataset(args)
    model = place(ddp.build(args, vocab_size), me.device)
    config = ddp.train_config(args, args.optimizer)
    if args.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(me.device.type, (me.world,))  # shards on the ranks' devices
        sharded = [*model.blocks, model]  # each block its own FSDP unit, then the root with what is left
        for module in sharded:
            fully_shard(module, mesh=mesh)
            if args.sum_gradients:  # the bug: the reduce-scatters sum and nothing divides. The factor is set
                module.set_gradient_divide_factor(1.0)  # per FSDP unit (it does not recurse), so on each
        wrapped = model
    else:
        wrapped = ddp.wrap(model, args)
    # the reference's optimizer; for ZeRO-1 its state split over the ranks
    optimizer = ddp.make_optimizer(model, config, args.optimizer, sharded=args.mode == "zero1")
    if args.skip_sync:
        if args.mode != "zero1":
            raise ValueError("--skip-sync belongs to --mode zero1")
        optimizer._sync_params = lambda: None  # step() updates the owned shard and sends nothing: the bug
    shard = 0 if args.same_shard else me.rank  # the negative control: the sampler forgotten, all read shard 0
    batches = place_each(ddp.shard_batches(x, y, args, shard, me.world), me.device)
    history = train(wrapped, batches, config, optimizer=optimizer, progress=False)
    full = {name: full_tensor(p) for name, p in model.named_parameters()}  # all-gathered: every rank gets all
    result = {"rank": me.rank, "world": me.world, "mode": args.mode, "local_loss": history.loss,
              "n_params": sum(p.numel() for p in full.values()), "weights": save_tensors("weights", full)}  # fmt: skip
    if args.mode == "fsdp" and args.checkpoint:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        path = result_dir() / "fsdp-checkpoint"
        dcp.save(get_model_state_dict(model), checkpoint_id=str(path))
        result["checkpoint"] = str(path)
    # one more step, after the weights were saved: its collectives counted, its gradients left to be measured
    bx, by = place(next(ddp.shard_batches(x, y, args, me.rank, me.world)), me.device)
    with CollectiveCounter() as counter:
        lm_loss(wrapped, bx, by).backward()
        optimizer.step()
    result["held_bytes"], result["collectives"] = held_bytes(model, optimizer), counter.calls
    params = list(model.parameters())
    if args.mode == "zero1":
        owned = [p for group in optimizer.optim.param_groups for p in group["params"]]
        result["owned"] = sorted(next(i for i, q in enumerate(params) if q is p) for p in owned)
        result["owned_numel"], result["owned_tensors"] = sum(p.numel() for p in owned), len(owned)
    if args.mode == "fsdp":
        result["local_numel"] = [local(p).numel() for p in params]
    return result


def main() -> None:
    args = parser().parse_args()
    save_result(run(args, init()))
    finish()

if __name__ == "__main__":
    main()
