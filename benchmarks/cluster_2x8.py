"""The two SLURM files at the size they declare, 2 nodes x 8 GPUs, run here as 16 CPU processes with stand-ins for
srun and scontrol (`course_lib.local_cluster`): a tiny model for a few steps, each compared with one process trained
on the same global batch (micro-batch 4 x 16 ranks = 64 windows a step). Prints each job's wall time and its gap to
the single-process weights. The tests run the same files at 2 x 2; this is the slow, full-size run.
Run: `.venv/bin/python benchmarks/cluster_2x8.py` (about three minutes on 2 cores: 65 s and 105 s).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from course_lib.local_cluster import sbatch_locally
from course_lib.parallel import ddp, deepspeed_train

CLUSTER = Path(__file__).resolve().parents[1] / "notebooks" / "cluster"
NODES, GPUS_PER_NODE = 2, 8
TINY = ["--steps", "3", "--layers", "1", "--width", "32", "--block", "16"]


def gap(weights: dict, reference: torch.nn.Module) -> float:
    return max((weights[name].double() - p.detach().double()).abs().max().item()
               for name, p in reference.named_parameters())  # fmt: skip


def main() -> None:
    world = NODES * GPUS_PER_NODE
    print(f"SLURM files at their declared size: {NODES} nodes x {GPUS_PER_NODE} ranks = {world} CPU processes")
    with tempfile.TemporaryDirectory(prefix="cluster-2x8-") as scratch:
        start = time.perf_counter()
        args = [*TINY, "--dtype", "float64"]
        job = sbatch_locally(CLUSTER / "torchrun_ddp.sbatch", args, nodes=NODES, gpus_per_node=GPUS_PER_NODE,
                             timeout=900, result_dir=Path(scratch) / "torchrun", show_output=False)  # fmt: skip
        seconds = time.perf_counter() - start
        reference, _ = ddp.single_process_run(ddp.parser().parse_args(args), ranks=world)
        print(f"  torchrun_ddp.sbatch   {len(job.results)} ranks, {seconds:6.1f} s, "
              f"max |Δ| to one process {gap(torch.load(job.results[0]['weights']), reference):.1e} (float64)")

        start = time.perf_counter()
        # 1e6-element buckets: DeepSpeed's default 5e8 (2 GB of float32 a rank) suits a GPU each, not 16 ranks
        # sharing this machine's 24 GiB
        deepspeed_args = [*TINY, "--zero-stage", "2", "--bucket-elements", "1000000", "--save-checkpoint"]
        job = sbatch_locally(CLUSTER / "deepspeed_zero.sbatch", deepspeed_args,
                             nodes=NODES, gpus_per_node=GPUS_PER_NODE, timeout=900,
                             result_dir=Path(scratch) / "deepspeed", show_output=False)  # fmt: skip
        seconds = time.perf_counter() - start
        reference, _ = ddp.single_process_run(ddp.parser().parse_args(TINY), ranks=world)
        weights = deepspeed_train.consolidate(job.results[0]["checkpoint"])
        print(f"  deepspeed_zero.sbatch {len(job.results)} ranks, {seconds:6.1f} s, "
              f"max |Δ| to one process {gap(weights, reference):.1e} (float32, ZeRO-2)")


if __name__ == "__main__":
    main()
