"""The launcher: results come back indexed by rank; a crash or a hang ends the run with the rank's error and
leaves no process behind; bad arguments are refused before anything starts; local runs use the loopback on every
platform, and a backend that cannot start says what to try."""

import os
import sys

import psutil
import pytest
import torch

from course_lib.launch import LaunchError, launch, local_rendezvous_env, run_commands


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_results_come_back_indexed_by_rank(capsys):
    results = launch("course_lib.parallel.hello", nproc=2, timeout=60)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 and r["backend"] == "gloo" and r["sum_of_ranks"] == 1.0 for r in results)
    printed = capsys.readouterr().out
    assert "[rank 0] rank 0 of 2" in printed and "[rank 1] rank 1 of 2" in printed
    assert not any(alive(r["pid"]) for r in results)


def test_a_rank_that_raises_fails_the_run_with_its_traceback():
    with pytest.raises(LaunchError) as error:
        launch("course_lib.parallel.hello", ["--fail-rank", "1"], nproc=2, timeout=60, show_output=False)
    message = str(error.value)
    assert "rank 1 failed" in message and "RuntimeError: rank 1 was told to fail" in message
    assert error.value.exit_codes == [1]  # torchrun's own exit code, one launcher


def test_a_rank_that_hangs_is_stopped_at_the_time_limit_and_nothing_is_left(tmp_path):
    with pytest.raises(LaunchError, match="did not finish within 8 s") as error:
        launch("course_lib.parallel.hello", ["--hang-rank", "0"], nproc=2, timeout=8, result_dir=tmp_path,
               show_output=False)  # fmt: skip
    assert error.value.exit_codes is None  # stopped, not exited
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"]) if "--hang-rank" in (p.info["cmdline"] or [])]
    assert leftovers == [], f"processes left behind: {leftovers}"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"module": "course_lib.parallel.no_such_thing"}, "module must name an importable entry point"),
        ({"module": "course_lib.parallel.hello", "nproc": 0}, "nproc must be a positive int"),
        ({"module": "course_lib.parallel.hello", "timeout": 0}, "timeout must be a positive number"),
        ({"module": "course_lib.parallel.hello", "threads_per_rank": 0}, "threads_per_rank must be a positive int"),
        ({"module": "course_lib.parallel.hello", "launcher": "mpirun"}, "launcher must be one of"),
        ({"module": "course_lib.parallel.hello", "nnodes": 0}, "nnodes must be a positive int"),
        ({"module": "course_lib.parallel.hello", "launcher": "deepspeed", "max_restarts": 1}, "restarts need launcher"),
    ],
)
def test_bad_arguments_are_refused_before_starting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        launch(**kwargs)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_on_this_machine_form_one_world(launcher):
    results = launch("course_lib.parallel.hello", nproc=2, nnodes=2, launcher=launcher, timeout=120, show_output=False)
    assert [(r["rank"], r["node"], r["local_rank"]) for r in results] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    assert all(r["world"] == 4 and r["sum_of_ranks"] == 6.0 for r in results)


def test_an_elastic_run_restarts_after_a_killed_rank_and_finishes():
    with pytest.raises(LaunchError):
        launch("course_lib.parallel.hello", ["--kill-once-rank", "1"], nproc=2, timeout=60, show_output=False)
    results = launch("course_lib.parallel.hello", ["--kill-once-rank", "1"], nproc=2, max_restarts=1, timeout=90,
                     show_output=False)  # fmt: skip
    assert [r["attempt"] for r in results] == [1, 1] and all(r["sum_of_ranks"] == 1.0 for r in results)


@pytest.mark.parametrize(
    "platform, expected",
    [("linux", {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}),
     ("darwin", {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo0"}),
     ("win32", {"MASTER_ADDR": "127.0.0.1", "USE_LIBUV": "0"})],
)  # fmt: skip
def test_local_runs_pin_the_rendezvous_and_gloo_to_the_loopback_of_each_platform(platform, expected):
    assert local_rendezvous_env(platform) == expected


def test_an_unknown_platform_is_refused_by_name():
    with pytest.raises(ValueError, match="platform must be one of .* got 'cygwin'"):
        local_rendezvous_env("cygwin")


def test_the_launched_processes_get_the_loopback_environment_unless_the_user_set_their_own(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")  # the user's choice wins
    report = ("import os, json; names = ('MASTER_ADDR', 'GLOO_SOCKET_IFNAME'); open(os.environ['COURSE_RESULT_DIR'] "
              "+ '/rank0.json', 'w').write(json.dumps({n: os.environ.get(n) for n in names}))")  # fmt: skip
    [seen] = run_commands([[sys.executable, "-c", report]], world=1, name="env", show_output=False)
    assert seen == {"MASTER_ADDR": "10.1.2.3", "GLOO_SOCKET_IFNAME": local_rendezvous_env()["GLOO_SOCKET_IFNAME"]}


def test_a_backend_that_cannot_start_says_what_to_try(monkeypatch):
    from course_lib.launch import free_port
    from course_lib.parallel.common import init

    environment = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(free_port())}  # rank 1 dials a rank 0 that never comes  # fmt: skip
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match="(?s)rank 1 could not start gloo at 127.0.0.1.*What to try.*GLOO_SOCKET"):
        init(timeout_s=1.0)


def test_more_ranks_than_gpus_run_on_the_cpu_and_deepspeed_is_told_so(monkeypatch):
    from course_lib.launch import deepspeed_accelerator, ranks_fit_on_gpus
    from course_lib.parallel.common import this_rank_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert ranks_fit_on_gpus(1) and not ranks_fit_on_gpus(2)  # a one-GPU laptop running chapter 09's two ranks
    assert (deepspeed_accelerator(1), deepspeed_accelerator(2)) == ("cuda", "cpu")
    monkeypatch.setenv("COURSE_RANKS_ON_CPU", "1")
    assert this_rank_device() == torch.device("cpu")
