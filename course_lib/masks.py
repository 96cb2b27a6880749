"""Causal, padding and BERT masked-language-model masks, and explicit conversions between conventions.

Three libraries, three conventions for "which keys are padding", and mixing them up gives silently wrong
attention. The names here say which one each tensor uses:

- attention mask (this course, and torch SDPA): bool, True = may attend, broadcastable to (B, H, T_q, T_k).
- token mask: bool (B, T), True = a real token, False = padding. What the functions here build.
- `key_padding_mask` (torch.nn.MultiheadAttention): bool (B, T), True = padding, ignore it.
- `attention_mask` (transformers): integer (B, T), 1 = real token, 0 = padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from course_lib.arguments import positive_int

PADDING_SIDES = ("right", "left")
IGNORE_INDEX = -100  # the label torch's cross_entropy skips: positions that carry no loss


def _check_2d_bool(name: str, mask: object, meaning: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        got = (
            f"{mask.dtype} tensor of shape {tuple(mask.shape)}"
            if isinstance(mask, torch.Tensor)
            else type(mask).__name__
        )
        raise ValueError(f"{name} must be a bool tensor of shape (B, T), {meaning}; got {got}")
    return mask


def causal_mask(size: int, device: torch.device | str | None = None, n_past: int = 0) -> torch.Tensor:
    """(T, n_past + T) attention mask where query i may attend to keys 0..n_past + i: the lower triangle,
    diagonal included. `n_past` keys already in a KV cache come first and are visible to every query.

    Masking the upper triangle is what keeps a language model from reading the token it must predict.
    """
    positive_int("size", size)
    if not isinstance(n_past, int) or isinstance(n_past, bool) or n_past < 0:
        raise ValueError(f"n_past must be an int >= 0, got {n_past!r}")
    return torch.ones(size, n_past + size, dtype=torch.bool, device=device).tril(n_past)


def token_mask_from_lengths(
    lengths: Sequence[int] | torch.Tensor, max_len: int | None = None, side: str = "right"
) -> torch.Tensor:
    """(B, T) token mask for sequences of the given lengths, padded on `side` to `max_len` (default: the
    longest). Batched generation with a decoder pads on the left, so that every sequence's last position is a
    real token and the next one is appended after it; training usually pads on the right (or packs)."""
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.numel() == 0 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be a non-empty 1-D sequence of ints, got {lengths.tolist()!r}")
    if (lengths < 0).any():
        raise ValueError(f"lengths must be >= 0, got {lengths.tolist()}")
    if side not in PADDING_SIDES:
        raise ValueError(f"side must be one of {PADDING_SIDES}, got {side!r}")
    longest = int(lengths.max())
    if max_len is None:
        max_len = max(longest, 1)
    positive_int("max_len", max_len)
    if longest > max_len:
        raise ValueError(f"max_len={max_len} is shorter than the longest sequence, {longest}")
    positions = torch.arange(max_len)
    if side == "right":
        return positions[None, :] < lengths[:, None]
    return positions[None, :] >= (max_len - lengths)[:, None]


def token_mask_from_ids(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T) token mask: True wherever the id is not `pad_id`."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError("input_ids must be an integer tensor of shape (B, T)")
    if not isinstance(pad_id, int) or isinstance(pad_id, bool):
        raise ValueError(f"pad_id must be an int, got {pad_id!r}")
    return input_ids != pad_id


def key_mask(token_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, T) attention mask from a token mask: every query may attend to every real key."""
    _check_2d_bool("token_mask", token_mask, "True = real token")
    return token_mask[:, None, None, :]


def combine_masks(*masks: torch.Tensor) -> torch.Tensor:
    """The logical AND of attention masks (a key is visible only if every mask allows it), broadcast."""
    if not masks:
        raise ValueError("combine_masks needs at least one mask")
    for i, mask in enumerate(masks):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(
                f"masks[{i}] must be a bool tensor (True = may attend), got {getattr(mask, 'dtype', type(mask))}"
            )
    try:
        shape = torch.broadcast_shapes(*(m.shape for m in masks))
    except RuntimeError:
        shapes = [tuple(m.shape) for m in masks]
        raise ValueError(f"masks must broadcast together, got shapes {shapes}") from None
    combined = torch.ones(shape, dtype=torch.bool, device=masks[0].device)
    for mask in masks:
        combined = combined & mask
    return combined


def causal_padding_mask(token_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) attention mask for a padded batch in a decoder: causal AND the key is a real token.

    With left padding, a padding query sees no key at all: its row is empty, which is fine because its
    output is never used and its label is IGNORE_INDEX.
    """
    _check_2d_bool("token_mask", token_mask, "True = real token")
    return combine_masks(causal_mask(token_mask.shape[1], device=token_mask.device), key_mask(token_mask))


def to_key_padding_mask(token_mask: torch.Tensor) -> torch.Tensor:
    """token mask (True = real) -> `nn.MultiheadAttention`'s key_padding_mask (True = padding, ignore)."""
    return ~_check_2d_bool("token_mask", token_mask, "True = real token")


def from_key_padding_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """`nn.MultiheadAttention`'s key_padding_mask (True = ignore) -> token mask (True = real)."""
    return ~_check_2d_bool("key_padding_mask", key_padding_mask, "True = padding")


def to_hf_attention_mask(token_mask: torch.Tensor) -> torch.Tensor:
    """token mask (True = real) -> the `transformers` attention_mask (int64, 1 = real, 0 = padding)."""
    return _check_2d_bool("token_mask", token_mask, "True = real token").long()


def from_hf_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The `transformers` attention_mask (1 = real, 0 = padding) -> token mask (True = real)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError("attention_mask must be a tensor of shape (B, T) holding 1 = real token, 0 = padding")
    if attention_mask.dtype == torch.bool or not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise ValueError(
            "attention_mask must hold only the integers 0 and 1 (the transformers convention); "
            f"got dtype {attention_mask.dtype} with values {attention_mask.unique().tolist()}"
        )
    return attention_mask == 1


@dataclass(frozen=True)
class MLMBatch:
    """One draw of BERT masking: the corrupted inputs, the labels, and where each rule applied."""

    input_ids: torch.Tensor  # what the model reads
    labels: torch.Tensor  # the original id at selected positions, IGNORE_INDEX elsewhere
    selected: torch.Tensor  # bool: positions the loss is computed on
    replaced_with_mask: torch.Tensor  # bool: selected and replaced by [MASK]
    replaced_with_random: torch.Tensor  # bool: selected and replaced by a random non-special token
    # selected & ~replaced_with_mask & ~replaced_with_random: selected and left unchanged


def mlm_mask(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Iterable[int],
    mlm_probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    generator: torch.Generator | None = None,
) -> MLMBatch:
    """BERT's masking: select each non-special token with probability `mlm_probability`; of those, replace
    80% by [MASK], 10% by a random token and leave 10% unchanged; labels are IGNORE_INDEX elsewhere.

    The draws follow the same sequence as `transformers.DataCollatorForLanguageModeling`, so with the same
    seeded generator both select the same positions. One deliberate difference: the random replacement is
    drawn from the non-special tokens only (the collator draws from the whole vocabulary, so it can insert
    [CLS] or [PAD] in the middle of a sentence).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError("input_ids must be an integer tensor of shape (B, T)")
    positive_int("vocab_size", vocab_size)
    if (input_ids < 0).any() or (input_ids >= vocab_size).any():
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size})")
    special = sorted(set(int(i) for i in special_token_ids))
    if mask_token_id not in special:
        raise ValueError(f"special_token_ids must include mask_token_id={mask_token_id} (and [PAD], [CLS], ...)")
    if any(not 0 <= i < vocab_size for i in special):
        raise ValueError(f"special_token_ids must lie in [0, vocab_size={vocab_size}), got {special}")
    for name, p in (
        ("mlm_probability", mlm_probability),
        ("mask_fraction", mask_fraction),
        ("random_fraction", random_fraction),
    ):
        if not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    if mask_fraction + random_fraction > 1:
        raise ValueError(f"mask_fraction + random_fraction must be <= 1, got {mask_fraction} + {random_fraction}")
    special_ids = torch.tensor(special)
    ordinary_ids = torch.ones(vocab_size, dtype=torch.bool)
    ordinary_ids[special_ids] = False
    ordinary_ids = ordinary_ids.nonzero().squeeze(1)
    if ordinary_ids.numel() == 0:
        raise ValueError("special_token_ids cover the whole vocabulary: there is no token to draw at random")

    shape = input_ids.shape
    is_special = torch.isin(input_ids, special_ids)
    probability = torch.full(shape, float(mlm_probability)).masked_fill(is_special, 0.0)
    selected = torch.bernoulli(probability, generator=generator).bool()
    replaced_with_mask = torch.bernoulli(torch.full(shape, float(mask_fraction)), generator=generator).bool()
    replaced_with_mask &= selected
    random_given_not_mask = random_fraction / (1 - mask_fraction) if mask_fraction < 1 else 0.0
    replaced_with_random = torch.bernoulli(torch.full(shape, random_given_not_mask), generator=generator).bool()
    replaced_with_random &= selected & ~replaced_with_mask
    random_tokens = ordinary_ids[torch.randint(len(ordinary_ids), shape, generator=generator)]

    corrupted = input_ids.clone()
    corrupted[replaced_with_mask] = mask_token_id
    corrupted[replaced_with_random] = random_tokens[replaced_with_random]
    labels = input_ids.masked_fill(~selected, IGNORE_INDEX)
    return MLMBatch(corrupted, labels, selected, replaced_with_mask, replaced_with_random)
