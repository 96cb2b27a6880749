import pytest
import torch
from torch import nn

from course_lib.measure import matmul_flops_per_s, net_allocated_bytes, saved_activation_bytes, storage_bytes


def test_storage_bytes_counts_views_and_shared_tensors_once():
    a = torch.zeros(10, 4)
    b = torch.zeros(3, dtype=torch.float64)
    assert storage_bytes([a]) == 160
    assert storage_bytes([a, a.t(), a[2:5], b]) == 160 + 24
    embedding, head = nn.Embedding(7, 5), nn.Linear(5, 7, bias=False)
    head.weight = embedding.weight  # tied, as GPT-2
    assert storage_bytes([*embedding.parameters(), *head.parameters()]) == 7 * 5 * 4


def test_storage_bytes_rejects_non_tensors():
    with pytest.raises(TypeError, match="tensors must be torch.Tensors"):
        storage_bytes([torch.zeros(1), [1.0]])


def test_saved_activation_bytes_sees_what_backward_needs_and_not_the_weights():
    layer = nn.Linear(8, 3, bias=False)
    x = torch.randn(5, 8, requires_grad=True)
    out, saved = saved_activation_bytes(lambda: layer(x).exp(), exclude=layer.parameters())
    # the matmul keeps its input (5x8), exp keeps its output (5x3); the weight is excluded
    assert saved == (5 * 8 + 5 * 3) * 4
    assert out.shape == (5, 3)
    _, with_weight = saved_activation_bytes(lambda: layer(x).exp())
    assert with_weight == saved + 8 * 3 * 4


def test_nothing_is_saved_without_autograd():
    x = torch.randn(4, 4)
    with torch.no_grad():
        _, saved = saved_activation_bytes(lambda: (x @ x).exp())
    assert saved == 0


def test_net_allocated_bytes_counts_what_stays_alive_and_not_temporaries():
    def work():
        temporary = torch.ones(1000) * 2  # allocated and freed inside
        return torch.full((250,), float(temporary.sum()))

    result, net = net_allocated_bytes(work)
    assert result.shape == (250,)
    assert net == 250 * 4


def test_matmul_peak_is_a_positive_rate_and_arguments_are_checked():
    assert matmul_flops_per_s(size=64, repeats=2) > 0
    with pytest.raises(ValueError, match="size must be a positive int"):
        matmul_flops_per_s(size=0)
    with pytest.raises(ValueError, match="repeats must be a positive int"):
        matmul_flops_per_s(repeats=0)


def test_the_profiler_logs_nothing_into_the_output(capfd):
    net_allocated_bytes(lambda: torch.ones(4))
    assert "profiler_st" not in capfd.readouterr().err
