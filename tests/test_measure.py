import pytest
import torch
from torch import nn

from course_lib.measure import (
    cpu_has_16bit_matmul,
    last_level_cache_bytes,
    matmul_flops_per_s,
    net_allocated_bytes,
    saved_activation_bytes,
    saved_bytes_by_dtype,
    storage_bytes,
)


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


def test_saved_bytes_by_dtype_splits_what_autocast_casts_from_what_stays_fp32():
    layer = nn.Linear(8, 3, bias=False)
    x = torch.randn(5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, by_dtype = saved_bytes_by_dtype(lambda: layer(x).float().exp(), exclude=layer.parameters())
    # the matmul saves bf16 casts of its input (5x8) and of the weight (8x3, a new tensor, not the parameter);
    # exp runs in fp32 and saves its output (5x3)
    assert by_dtype == {torch.bfloat16: (5 * 8 + 8 * 3) * 2, torch.float32: 5 * 3 * 4}
    _, total = saved_activation_bytes(lambda: layer(x).float().exp(), exclude=layer.parameters())
    assert total == (5 * 8 + 5 * 3) * 4  # without autocast: fp32 input and output, the weight excluded


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


def test_16bit_matmul_support_is_a_yes_or_no_and_other_dtypes_are_refused():
    for dtype in (torch.bfloat16, torch.float16):
        assert isinstance(cpu_has_16bit_matmul(dtype), bool)
    with pytest.raises(ValueError, match="dtype must be torch.bfloat16 or torch.float16, got torch.float32"):
        cpu_has_16bit_matmul(torch.float32)


def test_the_profiler_logs_nothing_into_the_output(capfd):
    net_allocated_bytes(lambda: torch.ones(4))
    assert "profiler_st" not in capfd.readouterr().err


def test_last_level_cache_is_the_largest_data_or_unified_level(tmp_path):
    for index, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"),
                                                 (2, "Unified", "2048K"), (3, "Unified", "105M")]):  # fmt: skip
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        (folder / "level").write_text(f"{level}\n")
        (folder / "type").write_text(f"{kind}\n")
        (folder / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 105 * 2**20
    assert last_level_cache_bytes(tmp_path / "missing") is None
