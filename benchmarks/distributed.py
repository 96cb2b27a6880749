"""Part III's timings in one run: DDP step time on 1 vs 2 processes, collective times by message size (the
course's ring and gloo's all_reduce), and the pipeline bubble measured against (p-1)/(m+p-1).

Everything runs as real processes through course_lib.launch (gloo on this CPU). Timings are printed, never
asserted. Run: `.venv/bin/python benchmarks/distributed.py`.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from course_lib.launch import launch
from course_lib.parallel.pipeline import idle_fractions

DDP_ARGS = ["--steps", "30", "--batch", "16", "--block", "64", "--width", "128", "--layers", "3"]
SIZES = [1_000, 10_000, 100_000, 1_000_000, 4_000_000]
MICROBATCHES = [2, 4, 8, 16]


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        print("DDP, chapter-05-sized GPT (3 layers, width 128), global batch 16 x 64, 1 thread per process")
        for n in (1, 2):
            results = launch("course_lib.parallel.ddp", DDP_ARGS, nproc=n, result_dir=Path(scratch) / f"ddp{n}",
                             show_output=False)  # fmt: skip
            step = statistics.median(results[0]["step_s"][5:])
            print(f"  {n} process{'es' if n > 1 else '  '}: {1e3 * step:7.1f} ms per step")

        print("\nall-reduce of float32 tensors, best of 7, 2 processes")
        print(f"  {'elements':>10} {'bytes':>11} {'ring (ms)':>10} {'gloo (ms)':>10} {'ring GB/s':>10}")
        ring = launch("course_lib.parallel.ring_allreduce", ["--sizes", *SIZES, "--repeats", "7"], nproc=2,
                      show_output=False)  # fmt: skip
        slowest = [max(r["ring_s"][i] for r in ring) for i in range(len(SIZES))]
        library = [max(r["all_reduce_s"][i] for r in ring) for i in range(len(SIZES))]
        for size, sent, t_ring, t_lib in zip(SIZES, ring[0]["bytes_sent"], slowest, library, strict=True):
            print(f"  {size:>10,} {4 * size:>11,} {1e3 * t_ring:10.3f} {1e3 * t_lib:10.3f} {sent / t_ring / 1e9:10.2f}")

        print("\npipeline bubble, 2 stages, 20 ms forward / 40 ms backward per micro-batch (sleep), second step")
        print(f"  {'schedule':8} {'m':>3} {'measured':>9} {'(p-1)/(m+p-1)':>14} {'step (ms)':>10}")
        for schedule in ("gpipe", "1f1b"):
            for m in MICROBATCHES:
                results = launch("course_lib.parallel.pipeline", ["--schedule", schedule, "--microbatches", m,
                                 "--batch", 16, "--sleep-ms", 20], nproc=2, result_dir=Path(scratch) / f"{schedule}{m}",
                                 show_output=False)  # fmt: skip
                stages, span = idle_fractions(results)
                idle = statistics.mean(stages)
                print(f"  {schedule:8} {m:>3} {idle:9.1%} {1 / (m + 1):14.1%} {1e3 * span:10.0f}")


if __name__ == "__main__":
    main()
