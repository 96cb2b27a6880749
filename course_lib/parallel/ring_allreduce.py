"""Ring all-reduce written with point-to-point send/recv, counting the bytes each rank sends.

The tensor is cut into N chunks. Reduce-scatter: N-1 steps, each rank sends one chunk to its right neighbour
and adds the chunk arriving from its left; afterwards rank r holds the full sum of chunk (r+1) mod N. All-
gather: N-1 more steps pass the finished chunks around the ring. Each rank sends 2(N-1) chunks of size/N: the
bandwidth term 2(N-1)/N · size, whatever N.

Run: torchrun --nproc-per-node N -m course_lib.parallel.ring_allreduce --sizes 1024 65536 [--no-allgather]
Each rank's tensor is torch.randn(size) from the seed 1000 + rank, so a single process can compute the sum.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from course_lib.parallel.common import Rank, finish, init, save_result
from course_lib.parallel.placement import place


def rank_tensor(rank: int, size: int) -> torch.Tensor:
    """The tensor rank `rank` contributes: reproducible anywhere from its rank."""
    return torch.randn(size, generator=torch.Generator().manual_seed(1000 + rank), dtype=torch.float32)


def ring_allreduce(x: torch.Tensor, allgather: bool = True) -> int:
    """Sum x over all ranks in place, around the ring; returns the bytes this rank sent."""
    rank, world = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % world, (rank - 1) % world
    chunks = list(x.chunk(world))  # views: writing into them writes into x
    sent = 0

    def exchange(send_index: int, recv_index: int) -> torch.Tensor:
        nonlocal sent
        incoming = torch.empty_like(chunks[recv_index])
        # send right and receive from the left as one batch: on NCCL a lone send, then a blocking recv, can deadlock
        pair = [dist.P2POp(dist.isend, chunks[send_index].contiguous(), right), dist.P2POp(dist.irecv, incoming, left)]
        for request in dist.batch_isend_irecv(pair):
            request.wait()
        sent += chunks[send_index].numel() * chunks[send_index].element_size()
        return incoming

    for step in range(world - 1):  # reduce-scatter
        send_index, recv_index = (rank - step) % world, (rank - step - 1) % world
        chunks[recv_index] += exchange(send_index, recv_index)
    if allgather:
        for step in range(world - 1):  # all-gather: pass the finished chunks on
            send_index, recv_index = (rank - step + 1) % world, (rank - step) % world
            chunks[recv_index].copy_(exchange(send_index, recv_index))
    return sent


def timed(fn, repeats: int, device: torch.device) -> float:
    """The best of `repeats` runs, each started together on all ranks: the least disturbed by other work. On a GPU
    the clock stops when the GPU has finished, not when the work was queued."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024], help="tensor sizes in float32 elements")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per size (best reported)")
    p.add_argument("--no-allgather", action="store_true", help="stop after reduce-scatter (a wrong all-reduce)")
    return p


def run(args: argparse.Namespace, me: Rank) -> dict:
    """This rank's part: the ring and the library's all-reduce on every size, checked and timed."""
    result = {"world": me.world, "sizes": args.sizes, "bytes_sent": [], "max_error_vs_all_reduce": [],
              "max_error_vs_sum": [], "ring_s": [], "all_reduce_s": [], "first_result": None,
              "first_reduce_scatter_only": None}  # fmt: skip
    for size in args.sizes:
        x = place(rank_tensor(me.rank, size), me.device)
        reference = x.clone()
        dist.all_reduce(reference)  # the library's all-reduce (a sum, as the ring's), to compare with
        ring = x.clone()
        result["bytes_sent"].append(ring_allreduce(ring, allgather=not args.no_allgather))
        result["max_error_vs_all_reduce"].append((ring - reference).abs().max().item())
        expected = place(sum(rank_tensor(r, size) for r in range(me.world)), me.device)  # every rank's, from its seed
        result["max_error_vs_sum"].append((ring - expected).abs().max().item())
        if result["first_result"] is None:
            result["first_result"] = ring.tolist()
            partial = x.clone()  # the negative control: reduce-scatter without the all-gather
            ring_allreduce(partial, allgather=False)
            result["first_reduce_scatter_only"] = partial.tolist()
        result["ring_s"].append(timed(lambda x=x: ring_allreduce(x.clone()), args.repeats, me.device))
        result["all_reduce_s"].append(timed(lambda x=x: dist.all_reduce(x.clone()), args.repeats, me.device))
        if me.rank == 0:
            print(f"size {size:>9,}: ring {1e3 * result['ring_s'][-1]:8.3f} ms, all_reduce "
                  f"{1e3 * result['all_reduce_s'][-1]:8.3f} ms, sent {result['bytes_sent'][-1]:,} B")  # fmt: skip
    return result


def main() -> None:
    args = parser().parse_args()
    save_result(run(args, init()))
    finish()

if __name__ == "__main__":
    main()
