"""Tensor parallelism (Megatron-LM): one GPT block's MLP and attention split across ranks, first with explicit
collectives, then with torch.distributed.tensor.parallel on a DeviceMesh.

The MLP's first layer is split by output features, the rows of nn.Linear's (out, in) weight (each rank computes
d_ff/N hidden units from the whole input), its second by input features, the weight's columns (each rank multiplies
its hidden units by its columns and gets a partial sum); one all-reduce adds the partial sums. Attention is split
by heads: q, k, v column-parallel (a rank owns H/N whole heads), out_proj row-parallel, again one all-reduce.
Backward mirrors it: one all-reduce of the input's gradient per module. Two autograd functions carry the
collectives (Megatron's f and g); a counter records each all-reduce. Two negative controls: `--wrong-shard` gives
each rank its neighbour's columns of the MLP's second weight, and `--f-without-all-reduce` plants the most common
tensor-parallel bug, an f that passes the gradient back without summing it over the ranks (forward is unchanged,
so the outputs stay right while the input gradients are wrong).

Run: torchrun --nproc-per-node 2 -m course_lib.parallel.tensor_parallel [--mode dtensor] [--wrong-shard]
     [--f-without-all-reduce]
`reference(args)` computes the same block on one process.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from course_lib.device import seed_everything
from course_lib.measure import storage_bytes
from course_lib.model import Block, GPTConfig
from course_lib.parallel.common import Rank, finish, init, local, save_result, save_tensors
from course_lib.parallel.placement import place

COMMUNICATION: list[dict] = []  # every all-reduce of the explicit version: where, and how many bytes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=("explicit", "dtensor"), default="explicit")
    p.add_argument("--wrong-shard", action="store_true", help="explicit mode: neighbour's W2 columns")
    p.add_argument("--f-without-all-reduce", action="store_true", help="explicit mode: f's backward forgets its sum")
    return p


def reference(args: argparse.Namespace) -> tuple[Block, torch.Tensor, torch.Tensor]:
    """The unsplit block (float64), the input and the probe that turns an output into a scalar loss."""
    seed_everything(args.seed)
    config = GPTConfig(vocab_size=2, block_size=args.seq, n_layer=1, n_head=args.heads, n_embd=args.width)
    block = Block(config).double()
    generator = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, args.seq, args.width, generator=generator, dtype=torch.float64)
    probe = torch.randn(args.batch, args.seq, args.width, generator=generator, dtype=torch.float64)
    return block, x, probe


def reference_gradients(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """On one process: each module's output, the input's gradient and every weight's gradient for the loss
    (output · probe).sum(), under the names the parallel runs save ("mlp.out", "attn.q_proj.weight.grad", ...)."""
    block, x, probe = reference(args)
    found = {}
    for name in ("mlp", "attn"):
        xin = x.clone().requires_grad_()
        module = getattr(block, name)
        out = module(xin)
        out = out[0] if isinstance(out, tuple) else out
        (out * probe).sum().backward()
        found[f"{name}.out"], found[f"{name}.x_grad"] = out.detach(), xin.grad
        found |= {f"{name}.{p}.grad": param.grad for p, param in module.named_parameters()}
    return found


def _all_reduce(t: torch.Tensor, where: str) -> torch.Tensor:
    COMMUNICATION.append({"where": where, "bytes": t.numel() * t.element_size()})
    dist.all_reduce(t)
    return t


class CopyToParallel(torch.autograd.Function):
    """Megatron's f: the input enters every rank's shard unchanged; backward sums the ranks' input gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _all_reduce(grad.contiguous(), "backward")


class CopyWithoutAllReduce(torch.autograd.Function):
    """f with its backward all-reduce forgotten: each rank keeps only its own shard's share of the input gradient.
    Forward is f's, so every output is still right; only the gradient flowing to earlier layers is wrong."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class ReduceFromParallel(torch.autograd.Function):
    """Megatron's g: the partial outputs of the row-parallel layer are summed; backward passes the gradient on."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(x.clone(), "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def shard(full: nn.Linear, dim: int, rank: int, world: int) -> nn.Linear:
    """This rank's slice of a Linear's (out, in) weight: dim 0 = output features (column-parallel), dim 1 = input
    features (row-parallel, bias left out: it is added once, after the sum)."""
    weight = full.weight.detach().chunk(world, dim=dim)[rank]
    part = nn.Linear(weight.shape[1], weight.shape[0], bias=dim == 0 and full.bias is not None, dtype=weight.dtype,
                     device=weight.device)  # fmt: skip
    with torch.no_grad():
        part.weight.copy_(weight)
        if part.bias is not None:
            part.bias.copy_(full.bias.detach().chunk(world)[rank])
    return part


class ParallelMLP(nn.Module):
    def __init__(self, mlp: nn.Module, rank: int, world: int, source_rank: int | None = None,
                 f: type[torch.autograd.Function] = CopyToParallel) -> None:  # fmt: skip
        super().__init__()
        self.fc = shard(mlp.fc, 0, rank, world)
        self.proj = shard(mlp.proj, 1, rank if source_rank is None else source_rank, world)
        self.proj_bias, self.f = mlp.proj.bias, f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.fc(self.f.apply(x)), approximate="tanh")  # d_ff / N hidden units
        return ReduceFromParallel.apply(self.proj(hidden)) + self.proj_bias  # partial sums added over ranks


class ParallelAttention(nn.Module):
    def __init__(self, attn: nn.Module, rank: int, world: int,
                 f: type[torch.autograd.Function] = CopyToParallel) -> None:  # fmt: skip
        super().__init__()
        self.q, self.k, self.v = (shard(getattr(attn, f"{n}_proj"), 0, rank, world) for n in "qkv")
        self.out = shard(attn.out_proj, 1, rank, world)
        self.out_bias, self.head_size, self.f = attn.out_proj.bias, attn.config.head_size, f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        x = self.f.apply(x)
        q, k, v = (p(x).view(b, t, -1, self.head_size).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # this rank's heads, nothing shared
        return ReduceFromParallel.apply(self.out(out.transpose(1, 2).reshape(b, t, -1))) + self.out_bias


def run_explicit(args, block: Block, x: torch.Tensor, probe: torch.Tensor, rank: int, world: int) -> dict:
    wrong = (rank + 1) % world if args.wrong_shard else None
    f = CopyWithoutAllReduce if args.f_without_all_reduce else CopyToParallel
    modules = {"mlp": ParallelMLP(block.mlp, rank, world, wrong, f),
               "attn": ParallelAttention(block.attn, rank, world, f)}  # fmt: skip
    result, tensors = {}, {}
    for name, module in modules.items():
        COMMUNICATION.clear()
        xin = x.clone().requires_grad_()
        out = module(xin)
        (out * probe).sum().backward()
        result[name] = {"all_reduces": list(COMMUNICATION), "param_bytes": storage_bytes(module.parameters())}
        tensors[f"{name}.out"], tensors[f"{name}.x_grad"] = out.detach(), xin.grad
        for pname, p in module.named_parameters():
            if p.grad is not None and not pname.endswith("_bias"):
                tensors[f"{name}.{pname}.grad"] = p.grad
    return result | {"tensors": save_tensors("explicit", tensors)}


def run_dtensor(block: Block, x: torch.Tensor, probe: torch.Tensor, world: int, device: torch.device) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh(device.type, (world,))  # on the ranks' devices: "cuda" over NCCL, "cpu" over gloo
    plans = {"mlp": {"fc": ColwiseParallel(), "proj": RowwiseParallel()},
             "attn": {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
                      "out_proj": RowwiseParallel()}}  # fmt: skip
    result, tensors = {}, {}
    for name, plan in plans.items():
        module = parallelize_module(getattr(block, name), mesh, plan)
        xin = x.clone().requires_grad_()
        with CommDebugMode() as comms:
            out = module(xin)
            out = out[0] if isinstance(out, tuple) else out  # attention also returns its keys and values
            forward_counts = {str(k): v for k, v in comms.get_comm_counts().items()}
            (out * probe).sum().backward()
        result[name] = {"forward_comms": forward_counts,
                        "total_comms": {str(k): v for k, v in comms.get_comm_counts().items()}}  # fmt: skip
        tensors[f"{name}.out"], tensors[f"{name}.x_grad"] = out.detach(), xin.grad
        for pname, p in module.named_parameters():
            tensors[f"{name}.{pname}.grad"] = local(p.grad)
    return result | {"tensors": save_tensors("dtensor", tensors)}


def check_world(args: argparse.Namespace, world: int) -> None:
    """Raise a ValueError if the options contradict each other or the heads do not split over `world` ranks."""
    if args.mode == "dtensor" and (args.wrong_shard or args.f_without_all_reduce):
        raise ValueError("--wrong-shard and --f-without-all-reduce change the explicit version: use --mode explicit")
    if args.heads % world:
        raise ValueError(f"--heads {args.heads} must be divisible by the number of ranks {world}")


def run(args: argparse.Namespace, me: Rank) -> dict:
    """This rank's shard of the block: outputs and gradients saved, all-reduces (or DTensor's comms) counted."""
    check_world(args, me.world)
    block, x, probe = place(reference(args), me.device)
    if args.mode == "explicit":
        result = run_explicit(args, block, x, probe, me.rank, me.world)
    else:
        result = run_dtensor(block, x, probe, me.world, me.device)
    return result | {"rank": me.rank, "world": me.world, "mode": args.mode}


def main() -> None:
    args = parser().parse_args()
    save_result(run(args, init()))
    finish()

if __name__ == "__main__":
    main()
