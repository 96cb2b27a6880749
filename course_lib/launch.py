"""Run a distributed entry point as real processes from a notebook, and get each rank's results back.

`mp.spawn` cannot start a function defined in a notebook (it is not importable), and `!torchrun` that fails
does not fail the cell. `launch` starts `torchrun` as a subprocess with a time limit, streams every rank's
output into the cell prefixed by its rank, and returns the `rank{r}.json` each rank wrote (with
`course_lib.parallel.common.save_result`) as a list indexed by rank. If a rank crashes or the run exceeds its
time limit, the whole process group is killed and a `LaunchError` shows the failing rank's traceback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

RESULT_DIR_ENV = "COURSE_RESULT_DIR"  # where an entry point writes rank{r}.json and any tensors it saves
PREFIX_RANK_ENV = "COURSE_PREFIX_RANK"  # "1": the ranks tag their own lines (launchers that do not, DeepSpeed's)
LAUNCHERS = ("torchrun", "deepspeed")
EXTENSIONS_DIR = Path(__file__).resolve().parents[1] / ".torch_extensions"  # DeepSpeed's compiled ops (make setup)
RANK_LINE = re.compile(r"^\[default(\d+)\]:(.*)$")  # torchrun --tee prefixes each rank's lines like this
TAIL_LINES = 40  # lines of a failing rank's output shown in the error


class LaunchError(RuntimeError):
    """A launched run failed: a rank crashed, the run hung past its time limit, or results are missing."""


def deepspeed_accelerator() -> str:
    """The accelerator DeepSpeed should use, said explicitly (it warns when it has to guess)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def free_port() -> int:
    """A TCP port nobody listens on now (DeepSpeed's launcher would otherwise use 29500 for every run)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _command(launcher: str, module: str, args: list[str], nproc: int, logs: Path) -> list[str]:
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--tee=3",
                f"--log-dir={logs}", "-m", module, *args]  # fmt: skip
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
            str(free_port()), "--no_local_rank", "--module", module, *args]  # fmt: skip


def _check_args(module: str, nproc: int, timeout: float, threads_per_rank: int) -> None:
    if not isinstance(module, str) or importlib.util.find_spec(module) is None:
        raise ValueError(f"module must name an importable entry point, e.g. 'course_lib.parallel.ddp', got {module!r}")
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ValueError(f"nproc must be a positive int, got {nproc!r}")
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(threads_per_rank, int) or threads_per_rank < 1:
        raise ValueError(f"threads_per_rank must be a positive int, got {threads_per_rank!r}")


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)  # end of output


def _kill(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop torchrun and every rank it started. The ranks run in sessions of their own, so each is found as a
    descendant first; torchrun gets SIGTERM (it forwards it to its ranks), then anything still alive SIGKILL."""
    family = []
    with contextlib.suppress(psutil.NoSuchProcess):
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    if process.poll() is None:
        process.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for leftover in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    process.wait()


def _tail(rank_lines: dict[int, list[str]], other_lines: list[str]) -> str:
    shown = [f"[rank {r}] {line}" for r, lines in sorted(rank_lines.items()) for line in lines[-10:]]
    return "\n".join(shown + other_lines[-10:])


def _failure_report(rank_lines: dict[int, list[str]], other_lines: list[str]) -> str:
    failed = [r for r, lines in sorted(rank_lines.items()) if any("Traceback" in line for line in lines)]
    if not failed:
        return "no rank printed a traceback; the last output:\n" + _tail(rank_lines, other_lines)
    parts = []
    for rank in failed:
        lines = rank_lines[rank]
        start = max(i for i, line in enumerate(lines) if "Traceback" in line)
        parts.append(f"rank {rank} failed:\n" + "\n".join(lines[max(start, len(lines) - TAIL_LINES) :]))
    return "\n".join(parts)


def launch(
    module: str,
    args: Sequence[str] = (),
    nproc: int = 2,
    timeout: float = 120.0,
    threads_per_rank: int = 1,
    result_dir: str | Path | None = None,
    show_output: bool = True,
    launcher: str = "torchrun",
) -> list[dict]:
    """Run `torchrun --standalone --nproc-per-node nproc -m module *args` (or `deepspeed --num_gpus nproc
    --master_port <free> --module module *args`) and return the ranks' results.

    `timeout` bounds the whole run; `threads_per_rank` sets OMP_NUM_THREADS (2 ranks x 1 thread on 2 cores);
    `result_dir` keeps what the ranks write (default: a temporary folder removed afterwards).
    """
    _check_args(module, nproc, timeout, threads_per_rank)
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    args = [str(a) for a in args]
    with tempfile.TemporaryDirectory(prefix="course-launch-") as scratch:
        results = Path(result_dir) if result_dir is not None else Path(scratch) / "results"
        results.mkdir(parents=True, exist_ok=True)
        for old in results.glob("rank*.json"):
            old.unlink()
        command = _command(launcher, module, args, nproc, Path(scratch) / "logs")
        env = os.environ | {
            "OMP_NUM_THREADS": str(threads_per_rank),
            "PYTHONUNBUFFERED": "1",
            RESULT_DIR_ENV: str(results),
            PREFIX_RANK_ENV: str(int(launcher == "deepspeed")),
        }
        env.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))  # fmt: skip
        env.setdefault("DS_ACCELERATOR", deepspeed_accelerator())
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                   start_new_session=True)  # fmt: skip
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
        rank_lines: dict[int, list[str]] = {r: [] for r in range(nproc)}
        other_lines: list[str] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    line = lines.get(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
                except queue.Empty:
                    if time.monotonic() >= deadline:
                        _kill(process)
                        raise LaunchError(f"{module} did not finish within {timeout:g} s and was stopped; "
                                          f"last output:\n{_tail(rank_lines, other_lines)}") from None  # fmt: skip
                    continue
                if line is None:
                    break
                match = RANK_LINE.match(line)
                if match:
                    rank, text = int(match.group(1)), match.group(2)
                    rank_lines.setdefault(rank, []).append(text)
                    if show_output:
                        print(f"[rank {rank}] {text}", flush=True)
                else:
                    other_lines.append(line)
            remaining = max(1.0, deadline - time.monotonic())
            process.wait(timeout=remaining)
        except BaseException:
            _kill(process)
            raise
        if process.returncode != 0:
            raise LaunchError(f"{module} failed (torchrun exit code {process.returncode}).\n"
                              f"{_failure_report(rank_lines, other_lines)}")  # fmt: skip
        missing = [r for r in range(nproc) if not (results / f"rank{r}.json").is_file()]
        if missing:
            raise LaunchError(f"{module} finished but ranks {missing} wrote no rank{{r}}.json into {RESULT_DIR_ENV}")
        return [json.loads((results / f"rank{r}.json").read_text()) for r in range(nproc)]
