import math

import pytest
import torch
import torch.nn.functional as F

from course_lib.attention import attention_scores, scaled_dot_product_attention
from course_lib.masks import causal_mask, causal_padding_mask, token_mask_from_lengths


@pytest.fixture
def qkv():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64)
    return q, k, v


def test_matches_torch_sdpa_and_weights_are_distributions(qkv):
    q, k, v = qkv
    output, weights = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(output, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=1e-12)
    assert weights.shape == (2, 3, 4, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 4, dtype=torch.float64))


def test_the_worked_example_by_hand():
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    Q = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    _, weights = scaled_dot_product_attention(Q, X, X)
    s = 1 / math.sqrt(2)
    first_row = torch.softmax(torch.tensor([0.0, s, s]), dim=0)  # q0·k = [0, 1, 1], scaled
    torch.testing.assert_close(weights[0], first_row)


def test_custom_scale_and_explicit_scores(qkv):
    q, k, v = qkv
    output, _ = scaled_dot_product_attention(q, k, v, scale=0.5)
    torch.testing.assert_close(output, F.scaled_dot_product_attention(q, k, v, scale=0.5), rtol=0, atol=1e-12)
    torch.testing.assert_close(attention_scores(q, k), q @ k.transpose(-2, -1) / math.sqrt(8))


def test_mask_matches_sdpa_and_hidden_keys_get_zero_weight(qkv):
    q, k, v = qkv
    mask = torch.rand(2, 1, 4, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[..., 0] = True
    output, weights = scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(output, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=1e-12)
    assert (weights.masked_select(~mask.expand_as(weights)) == 0).all()


def test_causal_mask_matches_is_causal():
    q = k = v = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    output, _ = scaled_dot_product_attention(q, k, v, causal_mask(6))
    torch.testing.assert_close(output, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=1e-12)


def test_empty_rows_raise_by_default_and_zero_on_request():
    q = k = v = torch.randn(2, 1, 4, 3, dtype=torch.float64)
    mask = causal_padding_mask(token_mask_from_lengths([2, 4], side="left"))
    with pytest.raises(ValueError, match=r'hides every key from 2 query row.*empty_rows="zero"'):
        scaled_dot_product_attention(q, k, v, mask)
    output, weights = scaled_dot_product_attention(q, k, v, mask, empty_rows="zero")
    assert not output.isnan().any()
    assert (output[0, 0, :2] == 0).all() and (weights[0, 0, :2] == 0).all()
    torch.testing.assert_close(output, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (
            (torch.ones(3, 2), torch.ones(3, 4), torch.ones(3, 4)),
            ValueError,
            r"k must have the same last dimension d_k.*\(\.\.\., T_k, 2\)",
        ),
        (
            (torch.ones(3, 2), torch.ones(3, 2), torch.ones(4, 2)),
            ValueError,
            r"v must have one row per key.*\(\.\.\., 3, d_v\)",
        ),
        ((torch.ones(2), torch.ones(3, 2), torch.ones(3, 2)), ValueError, r"q must have shape \(\.\.\., T, d\)"),
        (
            (torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2), torch.ones(3, 2)),
            TypeError,
            "q must have a floating-point dtype",
        ),
        (([[1.0]], torch.ones(3, 2), torch.ones(3, 2)), TypeError, "q must be a torch.Tensor"),
        ((torch.ones(3, 2), torch.ones(3, 2, dtype=torch.float64), torch.ones(3, 2)), TypeError, "share a dtype"),
        ((torch.ones(2, 3, 2), torch.ones(3, 3, 2), torch.ones(3, 3, 2)), ValueError, "must broadcast together"),
    ],
)
def test_bad_inputs_name_the_argument(args, error, message):
    with pytest.raises(error, match=message):
        scaled_dot_product_attention(*args)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.ones(3, 3), r"mask must be a bool tensor broadcastable to \(3, 4\).*dtype torch.float32"),
        (torch.ones(3, 3, dtype=torch.bool), r"mask must be a bool tensor broadcastable to \(3, 4\).*shape \(3, 3\)"),
        (torch.ones(2, 3, 4, dtype=torch.bool), r"got shape \(2, 3, 4\)"),
        ([[True]], "got list"),
    ],
)
def test_bad_masks_name_the_expected_shape(mask, message):
    with pytest.raises(ValueError, match=message):
        scaled_dot_product_attention(torch.ones(3, 2), torch.ones(4, 2), torch.ones(4, 2), mask)


@pytest.mark.parametrize("scale", [0, -1.0, float("inf"), "0.5"])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        scaled_dot_product_attention(torch.ones(3, 2), torch.ones(3, 2), torch.ones(3, 2), scale=scale)


def test_bad_empty_rows_policy():
    with pytest.raises(ValueError, match="empty_rows must be one of"):
        scaled_dot_product_attention(torch.ones(3, 2), torch.ones(3, 2), torch.ones(3, 2), empty_rows="nan")


def test_attention_scores_checks_its_inputs():
    with pytest.raises(ValueError, match="k must have the same last dimension d_k"):
        attention_scores(torch.ones(3, 2), torch.ones(3, 4))
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        attention_scores(torch.ones(3, 2), torch.ones(3, 2), scale=-1.0)
