"""DeepSpeed's tuning sweep in one launch: every ZeRO stage x gradient accumulation for the same global batch,
with throughput and the bytes each rank holds, side by side.

Runs course_lib.parallel.deepspeed_train --sweep on 2 CPU processes with the deepspeed launcher (the chapter-05-sized
GPT: 3 layers, width 128, windows of 64, global batch 16). Timings are printed, never asserted.
Run: `.venv/bin/python benchmarks/deepspeed_sweep.py`.
"""

from __future__ import annotations

import statistics

from course_lib.launch import launch

ARGS = ["--sweep", "--steps", "12", "--batch", "16", "--block", "64", "--width", "128", "--layers", "3",
        "--bucket-elements", "1000000"]  # fmt: skip


def main() -> None:
    results = launch("course_lib.parallel.deepspeed_train", ARGS, nproc=2, launcher="deepspeed", timeout=600,
                     show_output=False)  # fmt: skip
    print("DeepSpeed on 2 CPU processes, global batch 16 x 64 tokens, 12 steps per setting (first not timed)")
    print(f"{'ZeRO':>4} {'micro x acc':>11} {'tokens/s/rank':>14} {'params kB/rank':>15} {'Adam kB/rank':>13}")
    for run in results[0]["runs"]:
        rate = statistics.median(run["tokens_per_s"][1:])
        held = run["held_bytes"]
        print(f"{run['zero_stage']:>4} {run['micro_batch']:>7} x {run['accumulation']:<2} {rate:14,.0f} "
              f"{held['parameters'] / 1e3:15.1f} {held['optimizer'] / 1e3:13.1f}")


if __name__ == "__main__":
    main()
