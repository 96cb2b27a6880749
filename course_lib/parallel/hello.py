"""The smallest distributed program: every rank joins the group, says who it is, and all-reduces its rank.

Also the launcher's test subject: `--fail-rank R` makes rank R raise, `--hang-rank R` makes it sleep forever
(as a deadlocked rank would), so the tests can check that a failure or a hang ends the whole run cleanly; and
`--kill-once-rank R` kills rank R (SIGKILL, as a lost machine would) in the first attempt only, so an elastic
run (`torchrun --max-restarts`) can show that it restarts and finishes.
Run: torchrun --nproc-per-node N -m course_lib.parallel.hello
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import torch
import torch.distributed as dist

from course_lib.parallel.common import Rank, finish, init, save_result
from course_lib.parallel.placement import place


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fail-rank", type=int, default=None, help="this rank raises an error")
    p.add_argument("--hang-rank", type=int, default=None, help="this rank never finishes")
    p.add_argument("--kill-once-rank", type=int, default=None, help="this rank is killed in the first attempt")
    return p


def run(args: argparse.Namespace, me: Rank) -> dict:
    """Say who this rank is, fail or hang if told to, and all-reduce the rank numbers."""
    print(f"rank {me.rank} of {me.world}, backend {dist.get_backend()}, device {me.device}")
    if me.rank == args.fail_rank:
        raise RuntimeError(f"rank {me.rank} was told to fail")
    if me.rank == args.kill_once_rank and me.attempt == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    if me.rank == args.hang_rank:
        while True:
            time.sleep(1)
    node = os.environ.get("GROUP_RANK", os.environ.get("CROSS_RANK", "0"))  # torchrun's name for it, DeepSpeed's
    total = place(torch.tensor([float(me.rank)]), me.device)
    dist.all_reduce(total)
    return {"rank": me.rank, "world": me.world, "backend": dist.get_backend(), "pid": os.getpid(),
            "sum_of_ranks": total.item(), "attempt": me.attempt, "node": int(node),
            "local_rank": int(os.environ.get("LOCAL_RANK", "0"))}  # fmt: skip


def main() -> None:
    args = parser().parse_args()
    save_result(run(args, init()))
    finish()

if __name__ == "__main__":
    main()
