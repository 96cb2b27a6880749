"""The SLURM launch files a learner takes to a cluster: valid bash, launcher arguments the launchers' own parsers
accept, and, run on this machine with stand-ins for srun and scontrol, two real "nodes" that train like one process."""

import subprocess
from pathlib import Path

import pytest
import torch

from course_lib.launch import LaunchError
from course_lib.local_cluster import sbatch_locally
from course_lib.parallel import ddp, deepspeed_train

CLUSTER = Path(__file__).resolve().parents[1] / "notebooks" / "cluster"
TORCHRUN, DEEPSPEED = CLUSTER / "torchrun_ddp.sbatch", CLUSTER / "deepspeed_zero.sbatch"


@pytest.mark.parametrize("script", [TORCHRUN, DEEPSPEED], ids=lambda p: p.name)
def test_the_launch_files_are_valid_bash_asking_slurm_for_two_nodes(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text


def test_torchrun_file_gives_each_node_arguments_torchrun_accepts():
    from torch.distributed.run import get_args_parser

    job = sbatch_locally(TORCHRUN, ["--steps", "4"], nodes=2, gpus_per_node=3, dry_run=True)
    assert len(job.launcher_args) == 2 and job.launcher_args[0] == job.launcher_args[1]  # rendezvous assigns ranks
    assert job.launcher_args[0][:2] == ["-m", "torch.distributed.run"]
    parsed = get_args_parser().parse_args(job.launcher_args[0][2:])
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.rdzv_backend) == ("2", "3", "c10d")
    assert parsed.rdzv_endpoint.startswith("localhost:") and parsed.max_restarts == 3
    assert parsed.module and parsed.training_script == "course_lib.parallel.elastic"
    assert parsed.training_script_args[-2:] == ["--steps", "4"]
    assert job.launcher_args[0][-3] == f"{job.result_dir}/checkpoint"  # the script's folder, under the job's results
    assert "--checkpoint-dir $COURSE_RESULT_DIR/checkpoint --steps 4" in job.command_line(0)  # shown machine-free


def test_deepspeed_file_gives_each_node_its_own_node_rank_and_no_ssh():
    from deepspeed.launcher.runner import parse_args

    job = sbatch_locally(DEEPSPEED, ["--zero-stage", "3"], nodes=2, gpus_per_node=3, dry_run=True)
    parsed = [parse_args(args[2:]) for args in job.launcher_args]
    assert [p.node_rank for p in parsed] == [0, 1]
    assert all(p.no_ssh and p.num_nodes == 2 and p.num_gpus == 3 and p.master_addr == "localhost" for p in parsed)
    assert all(p.module and p.user_script == "course_lib.parallel.deepspeed_train" for p in parsed)
    assert parsed[0].user_args == ["--zero-stage", "3"]
    assert "--hostfile $COURSE_RESULT_DIR/hostfile" in job.command_line(1)


def test_torchrun_file_runs_two_nodes_of_two_here_that_train_like_one_process(tmp_path):
    args = ["--steps", "4", "--dtype", "float64"]
    job = sbatch_locally(TORCHRUN, args, gpus_per_node=2, result_dir=tmp_path, show_output=False)
    assert [r["rank"] for r in job.results] == [0, 1, 2, 3]
    reference, _ = ddp.single_process_run(ddp.parser().parse_args(args), ranks=4)  # 4 ranks x micro-batch 4
    weights = torch.load(job.results[0]["weights"])
    for name, expected in reference.state_dict().items():
        torch.testing.assert_close(weights[name], expected, atol=1e-10, rtol=0)


def test_deepspeed_file_runs_two_nodes_of_two_here_that_train_like_one_process(tmp_path):
    args = ["--steps", "4", "--zero-stage", "2", "--bucket-elements", "1000000", "--save-checkpoint"]
    job = sbatch_locally(DEEPSPEED, args, gpus_per_node=2, result_dir=tmp_path, timeout=300, show_output=False)
    weights = deepspeed_train.consolidate(job.results[0]["checkpoint"])
    reference, _ = ddp.single_process_run(ddp.parser().parse_args(["--steps", "4"]), ranks=4)
    for name, expected in reference.named_parameters():
        torch.testing.assert_close(weights[name].float(), expected.detach(), atol=1e-4, rtol=0)  # float32, 4 ranks


@pytest.mark.parametrize("script", [TORCHRUN, DEEPSPEED], ids=lambda p: p.name)
def test_the_files_defaults_are_valid_at_their_declared_size_and_a_global_batch_that_cannot_split_is_caught(script):
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text
    sbatch_locally(script, nodes=2, gpus_per_node=8, dry_run=True)  # raises if anything would fail at 2 x 8
    with pytest.raises(ValueError, match="fail on 2 nodes x 8 GPUs: --batch 8 \\(global\\) does not split over 16"):
        sbatch_locally(script, ["--batch", "8"], nodes=2, gpus_per_node=8, dry_run=True)
    sbatch_locally(script, ["--batch", "8"], nodes=2, gpus_per_node=2, dry_run=True)  # 8 splits over 4 ranks


def test_a_job_whose_launcher_starts_another_number_of_ranks_is_caught():
    from course_lib.local_cluster import check_job

    job = sbatch_locally(TORCHRUN, nodes=2, gpus_per_node=3, dry_run=True)
    with pytest.raises(ValueError, match="the launcher would start 6 ranks, but the job has 8 GPUs"):
        check_job(job.launcher_args[0], 8)
    with pytest.raises(ValueError, match="not a torchrun or DeepSpeed launch"):
        check_job(["train.py"], 8)


def test_a_job_whose_ranks_fail_raises_with_their_error(tmp_path):
    with pytest.raises(LaunchError, match="zero_optimization.stage must be 0, 1, 2 or 3, got 7"):
        sbatch_locally(DEEPSPEED, ["--zero-stage", "7"], result_dir=tmp_path, show_output=False)


def test_bad_requests_are_refused_before_anything_starts(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.sbatch"):
        sbatch_locally(tmp_path / "missing.sbatch")
    with pytest.raises(ValueError, match="nodes must be 1 or 2"):
        sbatch_locally(TORCHRUN, nodes=3)
    with pytest.raises(ValueError, match="gpus_per_node must be a positive int"):
        sbatch_locally(TORCHRUN, gpus_per_node=0)


def test_a_dry_run_turns_argument_errors_into_value_errors_that_say_whose():
    from course_lib.local_cluster import check_job

    job = sbatch_locally(TORCHRUN, nodes=2, gpus_per_node=2, dry_run=True)
    with pytest.raises(ValueError, match="course_lib.parallel.elastic refuses the arguments"):
        check_job([*job.launcher_args[0], "--no-such-flag"], 4)
    elastic_range = [a.replace("2", "1:2") if a == "2" else a for a in job.launcher_args[0]]  # --nnodes 1:2
    with pytest.raises(ValueError, match="must be fixed numbers for a dry run"):
        check_job(elastic_range, 4)
