"""Expert parallelism: a mixture-of-experts layer whose experts live on different ranks, tokens sent to them and
back with all_to_all.

A router picks one expert per token (top-1) and scales that expert's output by its gate probability. With E
experts on N ranks, rank r keeps experts r·E/N ... (r+1)·E/N - 1 only. One forward pass: route the local tokens,
sort them by expert, tell every rank how many tokens of each of its experts are coming (all_to_all of counts),
send the tokens (all_to_all), run the local experts on what arrived, send the results back (all_to_all with the
splits reversed) and put them back in the tokens' order. The router is replicated like a data-parallel weight
(its gradient is all-reduced); an expert's gradient needs no all-reduce: every token that used it came to its
rank. `--control` also runs the forward pass once more without the last reordering (the results left in expert
order), the negative control, in the same launch.

Traffic: in the forward pass rank r sends the tokens whose expert lives elsewhere and sends back the results of the
tokens that came to it, (remote_r + inbound_r) · width · bytes; the backward pass sends the same amounts again
(each all_to_all's gradient is the all_to_all with the splits swapped). `AllToAllBytes` measures it independently,
from the tensors and split sizes the collective itself is handed.

Run: torchrun --nproc-per-node 2 -m course_lib.parallel.expert --experts 4
`reference_run(args)` computes the same layer on all ranks' tokens in one process, for comparison.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from course_lib.device import seed_everything
from course_lib.parallel.common import Rank, finish, init, save_result, save_tensors
from course_lib.parallel.placement import place


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=4, help="experts in the layer, divisible by the number of ranks")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--hidden", type=int, default=32, help="each expert's MLP hidden width")
    p.add_argument("--tokens", type=int, default=24, help="tokens per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--control", action="store_true", help="also save the outputs left in expert order: wrong")
    return p


class MixtureOfExperts(nn.Module):
    """Top-1 mixture of experts: out = gate · expert_e(x), e = argmax of the router's softmax. `experts` is a dict
    by expert number, so a rank can keep only its own (`keep_only`)."""

    def __init__(self, width: int, hidden: int, n_experts: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.router = nn.Linear(width, n_experts, bias=False)
        self.experts = nn.ModuleDict(
            {str(e): nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
             for e in range(n_experts)})  # fmt: skip

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's expert and the gate probability its output is scaled by."""
        gate, expert = torch.softmax(self.router(x), dim=-1).max(dim=-1)
        return expert, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All experts in this process: the single-process reference."""
        expert, gate = self.route(x)
        out = torch.zeros_like(x)
        for e in range(self.n_experts):
            chosen = expert == e
            out = out.index_put((chosen,), self.experts[str(e)](x[chosen]))
        return out * gate[:, None]

    def keep_only(self, experts: range) -> None:
        for e in range(self.n_experts):
            if e not in experts:
                del self.experts[str(e)]


def build(args: argparse.Namespace) -> MixtureOfExperts:
    seed_everything(args.seed)  # the same router and experts everywhere; each rank then drops the others' experts
    return MixtureOfExperts(args.width, args.hidden, args.experts).double()


def rank_tokens(args: argparse.Namespace, rank: int) -> torch.Tensor:
    """The tokens rank `rank` brings (its micro-batch's activations), reproducible anywhere."""
    return torch.randn(args.tokens, args.width, generator=torch.Generator().manual_seed(1000 + rank),
                       dtype=torch.float64)  # fmt: skip


def loss_weights(args: argparse.Namespace, world: int) -> torch.Tensor:
    """Fixed weights w for the loss sum(w · out) over all ranks' tokens, so gradients are summed, not averaged."""
    return torch.randn(world * args.tokens, args.width, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
    """all_to_all that autograd can go back through (its backward is the all_to_all with the splits swapped)."""
    out = collectives.all_to_all_single_autograd(x, output_splits, input_splits, dist.group.WORLD)
    return collectives.wait_tensor(out)


class AllToAllBytes(TorchDispatchMode):
    """While active, records the bytes every all_to_all on this rank sends to other ranks, read from the input
    tensor and the input split sizes the collective op receives. It sits below autograd, so it also sees the
    all_to_alls that backward runs (and `dist.all_to_all_single`, which dispatches `c10d.alltoall_base_`)."""

    OPS = ("_c10d_functional.all_to_all_single", "c10d.alltoall_base_")

    def __init__(self, rank: int, world: int) -> None:
        super().__init__()
        self.rank, self.world = rank, world
        self.sent: list[int] = []  # one entry per all_to_all, in the order they ran

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).removesuffix(".default") in self.OPS:
            named = dict(zip((a.name for a in func._schema.arguments), args, strict=False)) | (kwargs or {})
            tensor, splits = named["input"], list(named["input_split_sizes"])
            splits = splits or [tensor.shape[0] // self.world] * self.world  # no splits: equal parts
            row = math.prod(tensor.shape[1:]) * tensor.element_size()  # bytes per token (also when none is sent)
            self.sent.append((sum(splits) - splits[self.rank]) * row)
        return func(*args, **(kwargs or {}))


def expert_parallel_forward(moe: MixtureOfExperts, x: torch.Tensor, unsort: bool = True) -> tuple[torch.Tensor, dict]:
    """The layer on this rank's tokens, its experts spread over the ranks; returns the output and the traffic."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = moe.n_experts // world
    expert, gate = moe.route(x)
    order = torch.argsort(expert, stable=True)  # tokens grouped by expert, hence by the rank that owns it
    send_counts = torch.bincount(expert, minlength=moe.n_experts)  # [destination rank, its local expert]
    recv_counts = torch.empty_like(send_counts)  # [source rank, my local expert]
    dist.all_to_all_single(recv_counts, send_counts)
    send_per_rank = send_counts.view(world, per_rank).sum(1).tolist()
    recv_per_rank = recv_counts.view(world, per_rank).sum(1).tolist()
    arrived = _all_to_all(x[order], recv_per_rank, send_per_rank)
    pieces = arrived.split(recv_counts.tolist())  # source-major, then by my local expert
    done = torch.cat([moe.experts[str(rank * per_rank + i % per_rank)](piece) for i, piece in enumerate(pieces)])
    returned = _all_to_all(done, send_per_rank, recv_per_rank)  # in the order the tokens were sent
    out = returned[torch.argsort(order)] if unsort else returned
    remote = sum(send_per_rank) - send_per_rank[rank]  # my tokens whose expert is elsewhere
    inbound = sum(recv_per_rank) - recv_per_rank[rank]  # other ranks' tokens for my experts, whose results go back
    traffic = {"tokens_per_expert_sent": send_counts.tolist(), "tokens_received": recv_counts.tolist(),
               "remote_tokens": remote, "inbound_tokens": inbound}  # fmt: skip
    return out * gate[:, None], traffic


def reference_run(args: argparse.Namespace, world: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One process, every expert, all ranks' tokens: the output, every weight's gradient and the tokens' gradient
    ("tokens", all ranks' rows)."""
    moe = build(args)
    x = torch.cat([rank_tokens(args, r) for r in range(world)]).requires_grad_()
    out = moe(x)
    (out * loss_weights(args, world)).sum().backward()
    return out.detach(), {name: p.grad for name, p in moe.named_parameters()} | {"tokens": x.grad}


def check_world(args: argparse.Namespace, world: int) -> None:
    """Raise a ValueError if the experts do not split evenly over `world` ranks."""
    if args.experts % world:
        raise ValueError(f"--experts {args.experts} must be divisible by the number of ranks {world}")


def run(args: argparse.Namespace, me: Rank) -> dict:
    """This rank's experts on its tokens: output and gradients saved, traffic counted and measured."""
    check_world(args, me.world)
    moe = place(build(args), me.device)
    mine = range(me.rank * args.experts // me.world, (me.rank + 1) * args.experts // me.world)
    moe.keep_only(mine)
    tokens = place(rank_tokens(args, me.rank), me.device).requires_grad_()  # activations: their gradient travels back
    forward, backward = AllToAllBytes(me.rank, me.world), AllToAllBytes(me.rank, me.world)
    with forward:
        out, traffic = expert_parallel_forward(moe, tokens)
    rows = slice(me.rank * args.tokens, (me.rank + 1) * args.tokens)
    with backward:
        (out * place(loss_weights(args, me.world)[rows], me.device)).sum().backward()
    dist.all_reduce(moe.router.weight.grad)  # replicated weight: sum the ranks' contributions
    grads = {name: p.grad for name, p in moe.named_parameters()} | {"tokens": tokens.grad}
    control = {}
    if args.control:  # the same tokens, the results not put back in the tokens' order
        with torch.no_grad():
            control["out_unsorted"] = expert_parallel_forward(moe, tokens, unsort=False)[0]
    print(f"rank {me.rank} holds experts {list(mine)}; its tokens chose {traffic['tokens_per_expert_sent']}, "
          f"{traffic['remote_tokens']} of {args.tokens} went to another rank")  # fmt: skip
    return {"rank": me.rank, "experts": list(mine), **traffic,
            "measured_bytes_sent": {"forward": forward.sent, "backward": backward.sent},
            "parameters": sum(p.numel() for p in moe.parameters()),
            "tensors": save_tensors("moe", {"out": out.detach(), **grads, **control})}  # fmt: skip


def main() -> None:
    args = parser().parse_args()
    save_result(run(args, init()))
    finish()

if __name__ == "__main__":
    main()
