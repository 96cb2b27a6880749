"""Run a SLURM batch script for a real cluster on this machine, its "nodes" being processes.

The scripts in `notebooks/cluster/` are written for a SLURM cluster: they read the job's node list with
`scontrol`, and `srun` starts one task per node. Here `sbatch_locally` runs such a script unchanged with
stand-ins for those two commands (put first on PATH): `scontrol show hostnames` lists the nodes as
`localhost` and `127.0.0.1` (two names for this machine, so DeepSpeed's hostfile has two hosts) and `srun` starts
its command once per node, all at once, each with its own SLURM_NODEID. The launcher the script calls through
`$PYTHON` is recorded per node (exactly the arguments a cluster would get), so they can be checked with the
launchers' own argument parsers; `dry_run` records them without starting anything, and checks what would fail on
the cluster: the ranks the launcher would start against the job's GPUs, and the entry point's arguments against that
world size (its `check_world`: a global batch that does not split over the ranks, say).
"""

from __future__ import annotations

import importlib
import os
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from course_lib.arguments import positive_int
from course_lib.launch import LOCAL_NODE_NAMES, deepspeed_accelerator, free_port, run_commands

SRUN = """#!/bin/bash
# stand-in for SLURM's srun: the command once per node, all at once, each task told its node number
while [[ "${1:-}" == -* ]]; do shift; done  # srun's own options do not matter on one machine
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

SCONTROL = """#!/bin/bash
# stand-in for `scontrol show hostnames LIST`: the node names, one per line
if [[ "${1:-} ${2:-}" != "show hostnames" ]]; then echo "scontrol stand-in: only 'show hostnames'" >&2; exit 2; fi
tr ',' '\\n' <<< "$3"
"""

PYTHON = """#!/bin/bash
# the script's $PYTHON: records the launcher's arguments for this node, then runs them (unless a dry run)
printf '%s\\0' "$@" > "$COURSE_RECORD_DIR/node${SLURM_NODEID}.args"
if [[ -n "${COURSE_DRY_RUN:-}" ]]; then exit 0; fi
exec "$COURSE_REAL_PYTHON" "$@"
"""


@dataclass(frozen=True)
class LocalJob:
    """What a batch script did here: each node's launcher arguments (after `python`), the ranks' results, and the
    job's result folder (the script's $COURSE_RESULT_DIR; a temporary one unless `result_dir` was given)."""

    launcher_args: list[list[str]]
    results: list[dict]
    result_dir: str

    def command_line(self, node: int) -> str:
        """Node `node`'s launcher arguments as one line, with the result folder written as the script names it,
        $COURSE_RESULT_DIR, so that the line reads the same on any machine."""
        return " ".join(self.launcher_args[node]).replace(self.result_dir, "$COURSE_RESULT_DIR")


def _write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _parse(parse, arguments: list[str], who: str):
    """argparse's result, or a ValueError instead of its exit (its message is on stderr already)."""
    try:
        return parse(arguments)
    except SystemExit:
        raise ValueError(f"{who} refuses the arguments {' '.join(arguments)} (its message is above)") from None


def entry_point_call(launcher_args: list[str]) -> tuple[int, str, list[str]]:
    """From one node's launcher arguments (after `python`): the ranks the launcher starts in all, the entry-point
    module, and that module's arguments, read with the launcher's own parser (torchrun's or DeepSpeed's)."""
    if launcher_args[:2] == ["-m", "torch.distributed.run"]:
        from torch.distributed.run import get_args_parser

        parsed = _parse(get_args_parser().parse_args, launcher_args[2:], "torchrun")
        counts = {"--nnodes": parsed.nnodes, "--nproc-per-node": parsed.nproc_per_node}
        if not all(str(value).isdigit() for value in counts.values()):
            raise ValueError(f"torchrun's {counts} must be fixed numbers for a dry run (not a range or 'gpu')")
        return int(parsed.nnodes) * int(parsed.nproc_per_node), parsed.training_script, parsed.training_script_args
    if launcher_args[:2] == ["-m", "deepspeed.launcher.runner"]:
        os.environ.setdefault("DS_ACCELERATOR", deepspeed_accelerator())  # said, so DeepSpeed does not warn on import
        from deepspeed.launcher.runner import parse_args

        parsed = _parse(parse_args, launcher_args[2:], "DeepSpeed's launcher")
        if parsed.num_nodes < 1 or parsed.num_gpus < 1:
            raise ValueError("DeepSpeed's --num_nodes and --num_gpus must be given for a dry run (no host discovery)")
        return parsed.num_nodes * parsed.num_gpus, parsed.user_script, parsed.user_args
    raise ValueError(f"not a torchrun or DeepSpeed launch: python {' '.join(launcher_args[:3])} ...")


def check_job(launcher_args: list[str], world: int) -> None:
    """Raise a ValueError saying what would fail on a cluster of `world` GPUs: a launcher starting another number of
    ranks, or arguments the entry point cannot run with on that many (its parser's and its `check_world`'s errors)."""
    ranks, module_name, module_args = entry_point_call(launcher_args)
    if ranks != world:
        raise ValueError(f"the launcher would start {ranks} ranks, but the job has {world} GPUs")
    module = importlib.import_module(module_name)
    args = _parse(module.parser().parse_args, module_args, module_name)
    if hasattr(module, "check_world"):  # entry points that run on any world size have none
        module.check_world(args, world)


def sbatch_locally(
    script: str | Path,
    args: list[str] = (),
    nodes: int = 2,
    gpus_per_node: int = 1,
    timeout: float = 120.0,
    result_dir: str | Path | None = None,
    show_output: bool = True,
    dry_run: bool = False,
) -> LocalJob:
    """Run the SLURM batch `script` with `args` as a job of `nodes` nodes with `gpus_per_node` ranks each (one CPU
    process per "GPU" here); returns each node's launcher arguments and, unless `dry_run`, the ranks' results. A dry
    run raises a ValueError if the job would fail at that size (`check_job`)."""
    script = Path(script)
    if not script.is_file():
        raise FileNotFoundError(f"script {str(script)!r} does not exist")
    if not isinstance(nodes, int) or not 1 <= nodes <= len(LOCAL_NODE_NAMES):
        raise ValueError(f"nodes must be 1 or 2 (this machine has {len(LOCAL_NODE_NAMES)} names), got {nodes!r}")
    positive_int("gpus_per_node", gpus_per_node)
    with tempfile.TemporaryDirectory(prefix="course-sbatch-") as scratch:
        scratch = Path(scratch)
        results_folder = Path(result_dir) if result_dir is not None else scratch / "results"
        stand_ins, records = scratch / "bin", scratch / "records"
        stand_ins.mkdir()
        records.mkdir()
        for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("python", PYTHON)):
            _write_executable(stand_ins / name, text)
        env = {
            "PATH": f"{stand_ins}{os.pathsep}{os.environ['PATH']}",
            "SLURM_JOB_ID": str(os.getpid()),
            "SLURM_JOB_NAME": "local-job",
            "SLURM_JOB_NODELIST": ",".join(LOCAL_NODE_NAMES[:nodes]),
            "SLURM_NNODES": str(nodes),
            "PYTHON": str(stand_ins / "python"),
            "COURSE_REAL_PYTHON": sys.executable,
            "COURSE_RECORD_DIR": str(records),
            "GPUS_PER_NODE": str(gpus_per_node),
            "PORT": str(free_port()),
        }
        if dry_run:
            env["COURSE_DRY_RUN"] = "1"
        command = ["bash", str(script), *map(str, args)]
        world = 0 if dry_run else nodes * gpus_per_node
        results = run_commands([command], world, script.name, timeout, result_dir=results_folder,
                               show_output=show_output, env=env)  # fmt: skip
        recorded = [records / f"node{node}.args" for node in range(nodes)]
        launcher_args = [path.read_text().split("\0")[:-1] for path in recorded if path.is_file()]
        if dry_run:
            for node_args in launcher_args:
                try:
                    check_job(node_args, nodes * gpus_per_node)
                except ValueError as error:
                    raise ValueError(f"{script.name} {' '.join(map(str, args))} would fail on {nodes} nodes x "
                                     f"{gpus_per_node} GPUs: {error}") from None  # fmt: skip
        return LocalJob(launcher_args, results, str(results_folder))
