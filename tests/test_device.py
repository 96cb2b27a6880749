import os
import random

import numpy as np
import pytest
import torch

from course_lib.device import pick_backend, pick_device, rank_device, seed_everything


def test_pick_device_prefers_gpu_when_present_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device().type == expected


def test_pick_device_honours_an_available_preference():
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_pick_device_refuses_a_missing_gpu():
    with pytest.raises(ValueError, match="prefer='cuda'.*no cuda device"):
        pick_device("cuda")


@pytest.mark.parametrize("prefer", ["tpu", "meta", 3])
def test_pick_device_rejects_unknown_kinds(prefer):
    with pytest.raises(ValueError, match="prefer must be a device of kind"):
        pick_device(prefer)


def test_pick_backend_rejects_unknown_devices():
    with pytest.raises(ValueError, match="device must be a device of kind"):
        pick_backend("gpu")


@pytest.mark.parametrize(
    ("device", "backend"), [("cpu", "gloo"), ("cuda", "nccl"), ("cuda:1", "nccl"), ("mps", "gloo")]
)
def test_pick_backend_matches_the_device(device, backend):
    assert pick_backend(device) == backend


def test_pick_backend_default_follows_pick_device():
    assert pick_backend() == ("nccl" if pick_device().type == "cuda" else "gloo")


def test_seed_everything_repeats_every_source_of_randomness():
    def draw():
        gen = seed_everything(123)
        return random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=gen)

    first, second = draw(), draw()
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])
    seed_everything(124)
    assert not torch.equal(torch.rand(3), first[2])


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "7", True])
def test_seed_everything_rejects_bad_seeds(seed):
    with pytest.raises(ValueError, match="seed must be an int"):
        seed_everything(seed)


def test_a_rank_uses_its_own_gpu_or_else_the_cpu_never_mps():
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert rank_device(0) == expected  # on a Mac with MPS too: gloo cannot reduce MPS tensors


@pytest.mark.parametrize("local_rank", [-1, 1.0, True, "0"])
def test_rank_device_refuses_a_bad_local_rank_by_name(local_rank):
    with pytest.raises(ValueError, match="local_rank must be an int >= 0"):
        rank_device(local_rank)


def test_deterministic_seeding_fixes_cublas_workspace_for_cuda(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seed_everything(0, deterministic=False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    seed_everything(0)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_with_gpus_each_rank_takes_its_own_and_a_rank_beyond_them_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device(1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="local_rank 2 has no GPU: this process sees 2"):
        rank_device(2)
