"""Execute every notebook headless, as `make course` does, and print its wall time against its budget.

Run with `make bench` (or `.venv/bin/python benchmarks/notebook_times.py [notebooks ...]`). The notebooks on
disk are not modified: each is executed in memory. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
# Time budgets from COURSE.md section 4, for a full run on the 2-core CPU machine.
BUDGET_S = {
    "01": 60,
    "02": 60,
    "03": 90,
    "04": 90,
    "05": 240,
    "06": 120,
    "07": 150,
    "08": 90,
    "09": 120,
    "10": 120,
    "11": 150,
    "12": 120,
    "13": 240,
    "14": 120,
}


def run(path: Path, kernel: str) -> tuple[float, str]:
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.perf_counter()
    try:
        client.execute()
        status = "ok"
    except Exception as error:  # report and go on: one broken chapter should not hide the others' times
        status = f"FAILED: {type(error).__name__}"
    return time.perf_counter() - start, status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/NN_*.ipynb")
    args = parser.parse_args()
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    kernel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["course"]["kernel-name"]
    print(f"{'notebook':<34} {'wall s':>7} {'budget s':>9}  status")
    total, failed = 0.0, False
    for path in paths:
        seconds, status = run(path, kernel)
        total += seconds
        budget = BUDGET_S.get(path.name[:2])
        over = budget is not None and seconds > budget
        failed |= status != "ok"
        budget_text = f"{budget:>9}" if budget else f"{'-':>9}"
        note = status + (" (over budget)" if over else "")
        print(f"{path.name:<34} {seconds:7.1f} {budget_text}  {note}", flush=True)
    print(f"{'total':<34} {total:7.1f} {sum(BUDGET_S.get(p.name[:2], 0) for p in paths):>9}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
