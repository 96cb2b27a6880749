"""GPU smoke test: every distributed entry point once with NCCL, one rank per GPU, DeepSpeed ZeRO 1-3 in bf16, and
the chapters whose device follows `pick_device`, each compared with its single-process reference. Prints a table.

For a machine with CUDA GPUs (`make gpu-smoke`); the CPU tests cannot see a GPU-only bug, this can. World size: every
GPU (`torch.cuda.device_count()`); on one GPU, world 1 still checks that each rank computes on its device.
`--cpu` runs the same checks with gloo on 2 CPU processes, to try the script itself on a machine without a GPU.
Run: `.venv/bin/python benchmarks/gpu_smoke.py [--cpu] [--notebooks 05_training_a_small_gpt ...]`.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from course_lib.launch import launch
from course_lib.parallel import ddp, deepspeed_train, expert, pipeline, tensor_parallel
from course_lib.parallel.ring_allreduce import rank_tensor

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("05_training_a_small_gpt",)  # the chapters that pick their device; 09-14 run the entry points below
FLOAT64 = ["--steps", "4", "--dtype", "float64"]


def gap(found: dict, expected: dict) -> float:
    """The largest |difference| over the tensors `expected` names, all of which the run must have saved: the
    distance to the single-process reference, in the tensors' own units."""
    missing = expected.keys() - found.keys()
    if missing:
        raise KeyError(f"missing from the run's tensors: {sorted(missing)[:5]}")
    return max((found[k].detach().cpu().double() - v.detach().cpu().double()).abs().max().item()
               for k, v in expected.items())  # fmt: skip


def multiple_of(world: int, at_least: int) -> int:
    """The smallest multiple of `world` that is at least `at_least`: heads, layers that split over every rank."""
    return world * math.ceil(at_least / world)


class Smoke:
    """Launches entry points on every GPU and collects one table row per check, a crash included, so one run shows
    every failure at once."""

    def __init__(self, world: int, scratch: Path) -> None:
        self.world, self.scratch, self.rows = world, scratch, []

    def run(self, module: str, args: list, launcher: str = "torchrun", **kwargs) -> list[dict]:
        folder = self.scratch / f"run{len(self.rows)}"
        return launch(module, args, nproc=self.world, result_dir=folder, timeout=600, show_output=False,
                      launcher=launcher, threads_per_rank=2, **kwargs)  # fmt: skip

    def check(self, name: str, tolerance: float, measure: Callable[[], tuple[float, str]]) -> None:
        start = time.perf_counter()
        try:
            value, backend = measure()
            ok = value <= tolerance
        except Exception as error:  # a crash is a row too, so the table shows every failure at once
            value, backend, ok = float("nan"), f"{type(error).__name__}: {str(error).splitlines()[0][:60]}", False
        self.rows.append((name, backend, value, tolerance, ok, time.perf_counter() - start))
        print(f"{name:<32} {backend:<10} {value:>10.2e} {tolerance:>8.0e} {'ok' if ok else 'FAIL':>4} "
              f"{self.rows[-1][-1]:>6.1f} s", flush=True)  # fmt: skip


def entry_point_checks(smoke: Smoke) -> None:
    world = smoke.world

    def hello():
        results = smoke.run("course_lib.parallel.hello", [])
        return max(abs(r["sum_of_ranks"] - world * (world - 1) / 2) for r in results), backend_of(results)

    def ring():
        results = smoke.run("course_lib.parallel.ring_allreduce", ["--sizes", "1024", "1048576", "--repeats", "3"])
        expected = sum(rank_tensor(r, 1024) for r in range(world))
        first = max((torch.tensor(r["first_result"]) - expected).abs().max().item() for r in results)
        return max(first, *(max(r["max_error_vs_sum"]) for r in results)), backend_of(results)

    heads = multiple_of(world, 4)
    tp_args = ["--heads", heads, "--width", 8 * heads]

    def tensor(mode):
        def measure():
            results = smoke.run("course_lib.parallel.tensor_parallel", [*tp_args, "--mode", mode])
            shards = [torch.load(r["tensors"]) for r in results]
            expected = tensor_parallel.reference_gradients(tensor_parallel.parser().parse_args(map(str, tp_args)))
            whole = [k for k in expected if k.endswith((".out", ".x_grad"))]
            worst = max(gap(s, {k: expected[k] for k in whole}) for s in shards)
            joined = {"mlp.fc.weight.grad": torch.cat([s["mlp.fc.weight.grad"] for s in shards], dim=0)}
            return max(worst, gap(joined, {k: expected[k] for k in joined})), backend_of(results)

        return measure

    def pipelined(schedule):
        def measure():
            args = ["--schedule", schedule, "--layers", multiple_of(world, 4), "--microbatches", "4"]
            results = smoke.run("course_lib.parallel.pipeline", args)
            weights = {}
            for r in results:
                weights |= torch.load(r["weights"])
            reference, _ = pipeline.single_process_run(pipeline.parser().parse_args(map(str, args)))
            return gap(weights, dict(reference.named_parameters())), backend_of(results)

        return measure

    reference = dict(ddp.single_process_run(ddp.parser().parse_args(FLOAT64), ranks=world)[0].named_parameters())

    def data_parallel(module, extra):
        def measure():
            results = smoke.run(module, [*FLOAT64, *extra], max_restarts=1 if "elastic" in module else 0)
            return max(gap(torch.load(r["weights"]), reference) for r in results), backend_of(results)

        return measure

    def experts():
        args = ["--experts", 2 * world, "--seed", "1"]
        results = smoke.run("course_lib.parallel.expert", args)
        parsed = expert.parser().parse_args(map(str, args))
        out, grads = expert.reference_run(parsed, world)
        worst = 0.0
        for rank, r in enumerate(results):
            rows = slice(rank * parsed.tokens, (rank + 1) * parsed.tokens)
            worst = max(worst, gap(torch.load(r["tensors"]), {"out": out[rows], "tokens": grads["tokens"][rows]}))
        return worst, backend_of(results)

    smoke.check("hello", 0.0, hello)
    smoke.check("ring_allreduce", 1e-4, ring)
    for mode in ("explicit", "dtensor"):
        smoke.check(f"tensor_parallel {mode}", 1e-10, tensor(mode))
    for schedule in ("gpipe", "1f1b"):
        smoke.check(f"pipeline {schedule}", 1e-10, pipelined(schedule))
    smoke.check("ddp", 1e-8, data_parallel("course_lib.parallel.ddp", []))
    for mode in ("ddp", "zero1", "fsdp"):
        smoke.check(f"zero {mode}", 1e-8, data_parallel("course_lib.parallel.zero", ["--mode", mode]))
    kill = ["--checkpoint-dir", smoke.scratch / "elastic", "--checkpoint-every", "2", "--kill-rank", world - 1,
            "--kill-at-step", "3"]  # fmt: skip
    smoke.check("elastic, a rank killed", 1e-8, data_parallel("course_lib.parallel.elastic", kill))
    smoke.check("expert", 1e-10, experts)


def deepspeed_checks(smoke: Smoke) -> None:
    """ZeRO 1-3 against one fp32 process. fp32: the largest weight difference, tightly. bf16 rounds every step and
    Adam turns rounding into whole steps of lr on near-zero gradients, so its weights are compared as a whole: the
    norm of (bf16 - reference) over the norm of the reference's own training (reference - initial). A bf16 run that
    did not train scores 1; one that trained like the reference well under it."""
    args = ddp.parser().parse_args(["--steps", "4"])
    reference = dict(ddp.single_process_run(args, ranks=smoke.world)[0].named_parameters())
    initial = dict(ddp.build(args, ddp.dataset(ddp.for_world(args, smoke.world))[2]).named_parameters())

    def distance(a: dict, b: dict) -> float:
        return sum(((a[k].detach().cpu().double() - b[k].detach().cpu().double()) ** 2).sum() for k in b).sqrt().item()

    def zero(stage, precision):
        def measure():
            args = ["--steps", "4", "--zero-stage", stage, "--precision", precision, "--save-checkpoint"]
            results = smoke.run("course_lib.parallel.deepspeed_train", args, launcher="deepspeed")
            weights = deepspeed_train.consolidate(results[0]["checkpoint"])
            if precision == "fp32":
                return gap(weights, reference), backend_of(results)
            return distance(weights, reference) / distance(initial, reference), backend_of(results)

        return measure

    precisions = ("bf16", "fp32") if torch.cuda.is_available() else ("fp32",)  # bf16 on a CPU: too slow to matter
    for precision in precisions:
        for stage in (1, 2, 3):
            name = f"deepspeed ZeRO-{stage} {precision}" + (" ‖Δ‖/‖moved‖" if precision == "bf16" else "")
            smoke.check(name, 0.5 if precision == "bf16" else 1e-4, zero(stage, precision))


def notebook_checks(smoke: Smoke, names: list[str]) -> None:
    for name in names:

        def measure(name=name):
            notebook = ROOT / "notebooks" / f"{name}.ipynb"
            command = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--output-dir",
                       str(smoke.scratch), "--ExecutePreprocessor.timeout=600", str(notebook)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT / "notebooks")
            if done.returncode:
                raise RuntimeError(done.stderr.strip().splitlines()[-1])
            return 0.0, "cuda" if torch.cuda.is_available() else "cpu"  # a claim that fails stops the notebook

        smoke.check(f"chapter {name[:2]}, every claim", 0.0, measure)


def backend_of(results: list[dict]) -> str:
    """The backend the ranks reported using (save_result records it), so a GPU run that fell back to gloo shows."""
    return "/".join(sorted({r["backend"] for r in results}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="no GPU here: the same checks with gloo on 2 processes")
    parser.add_argument("--notebooks", nargs="*", default=list(NOTEBOOKS), help="chapters to execute (file stems)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu:
        sys.exit("no CUDA GPU here: run `make gpu-smoke` on a GPU machine, or pass --cpu to try the script")
    world = torch.cuda.device_count() if torch.cuda.is_available() else 2
    gpus = f"{world} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU, 2 CPU processes"
    print(f"GPU smoke test: {gpus}, torch {torch.__version__}\n")
    print(f"{'check':<32} {'backend':<10} {'max |Δ|':>10} {'tol':>8} {'':>4} {'time':>8}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as scratch:
        smoke = Smoke(world, Path(scratch))
        entry_point_checks(smoke)
        deepspeed_checks(smoke)
        notebook_checks(smoke, args.notebooks)
    failed = [row[0] for row in smoke.rows if not row[4]]
    minutes = (time.perf_counter() - start) / 60
    print(f"\n{len(smoke.rows) - len(failed)} of {len(smoke.rows)} checks hold, in {minutes:.1f} minutes"
          + (f"; failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
