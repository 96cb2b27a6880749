"""Scaled dot-product attention written out, step by step, with the checks a learner needs.

    weights = softmax(q kᵀ · scale, over the keys),   output = weights v,   scale = 1/√d_k by default.

PyTorch's fused `scaled_dot_product_attention` returns only the output and accepts many inputs that are
almost certainly mistakes; this version returns the weights too and refuses such inputs with an error
that names the argument and the shape it expected.

Mask convention (shared by every module here): a boolean `mask`, True = this query may attend to this
key, broadcastable to (..., T_q, T_k). A query row whose mask hides every key has no distribution to
normalise (softmax of all -inf is 0/0): by default that raises, because it is usually a bug;
`empty_rows="zero"` returns zero weights and a zero output for such rows, as torch's SDPA does.
"""

from __future__ import annotations

import math

import torch

EMPTY_ROW_POLICIES = ("raise", "zero")


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    if value.dim() < 2:
        raise ValueError(f"{name} must have shape (..., T, d) with at least 2 dimensions, got {tuple(value.shape)}")
    return value


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    """Validate q, k, v and return the shape of the scores, (..., T_q, T_k)."""
    for name, value in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, value)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k must have the same last dimension d_k as q: expected k of shape (..., T_k, {q.shape[-1]}), "
            f"got {tuple(k.shape)}"
        )
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"v must have one row per key: expected v of shape (..., {k.shape[-2]}, d_v), got {tuple(v.shape)}"
        )
    try:
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the leading (batch, head) dimensions of q {tuple(q.shape[:-2])}, k {tuple(k.shape[:-2])} "
            f"and v {tuple(v.shape[:-2])} must broadcast together"
        ) from None
    return (*batch, q.shape[-2], k.shape[-2])


def _check_mask(mask: object, scores_shape: tuple[int, ...]) -> torch.Tensor:
    expected = f"a bool tensor broadcastable to {scores_shape} (..., T_q, T_k), True = may attend"
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be {expected}; got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be {expected}; got dtype {mask.dtype}. An additive float mask (0 / -inf) or a "
            "transformers attention_mask (1 = keep) must be converted first (see course_lib.masks)"
        )
    try:
        broadcast = torch.broadcast_shapes(mask.shape, scores_shape)
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(scores_shape):
        raise ValueError(f"mask must be {expected}; got shape {tuple(mask.shape)}")
    return mask


def attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q kᵀ · scale: how well each query matches each key, before any mask or softmax."""
    _check_inputs(q, k, k)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a positive finite number or None (= 1/sqrt(d_k)), got {scale!r}")
    return (q @ k.transpose(-2, -1)) * scale


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    empty_rows: str = "raise",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries q (..., T_q, d_k) over keys k (..., T_k, d_k) and values v (..., T_k, d_v).

    Returns `(output, weights)`: output (..., T_q, d_v) and weights (..., T_q, T_k), each weight row a
    probability distribution over the keys that row may see.
    """
    scores_shape = _check_inputs(q, k, v)
    if empty_rows not in EMPTY_ROW_POLICIES:
        raise ValueError(f"empty_rows must be one of {EMPTY_ROW_POLICIES}, got {empty_rows!r}")
    scores = attention_scores(q, k, scale)
    if mask is None:
        weights = torch.softmax(scores, dim=-1)
        return weights @ v, weights

    mask = _check_mask(mask, scores_shape).expand(scores_shape)
    empty = ~mask.any(dim=-1, keepdim=True)
    if empty.any() and empty_rows == "raise":
        where = tuple(int(i) for i in empty.squeeze(-1).nonzero()[0])
        raise ValueError(
            f"mask hides every key from {int(empty.sum())} query row(s), the first at index {where} of "
            f"(..., T_q) = {tuple(scores_shape[:-1])}. Softmax over only -inf scores is 0/0 (NaN). Such "
            "rows are legitimate for padded queries, whose outputs are then excluded from the loss: pass "
            'empty_rows="zero" to give them zero weights, as torch\'s SDPA does.'
        )
    scores = scores.masked_fill(~mask, float("-inf"))
    scores = scores.masked_fill(empty, 0.0)  # any finite value: these rows are zeroed below
    weights = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    return weights @ v, weights
