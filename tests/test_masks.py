import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForLanguageModeling

from course_lib import masks
from course_lib.assets import minilm_dir, package_dir


def test_causal_mask_is_the_lower_triangle():
    assert masks.causal_mask(3).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


def test_causal_mask_with_cached_keys_lets_every_query_see_the_past():
    assert masks.causal_mask(2, n_past=2).int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert torch.equal(masks.causal_mask(4)[2:], masks.causal_mask(2, n_past=2))


@pytest.mark.parametrize(("side", "expected"), [("right", [[1, 1, 0], [1, 1, 1]]), ("left", [[0, 1, 1], [1, 1, 1]])])
def test_token_mask_from_lengths_pads_on_the_requested_side(side, expected):
    assert masks.token_mask_from_lengths([2, 3], side=side).int().tolist() == expected


def test_token_mask_from_lengths_respects_max_len_and_zero_length():
    assert masks.token_mask_from_lengths(torch.tensor([0, 2]), max_len=4).int().tolist() == [[0, 0, 0, 0], [1, 1, 0, 0]]


def test_token_mask_from_ids():
    ids = torch.tensor([[5, 6, 0], [7, 0, 0]])
    assert masks.token_mask_from_ids(ids, pad_id=0).int().tolist() == [[1, 1, 0], [1, 0, 0]]


def test_conversions_round_trip_and_say_their_convention():
    tokens = masks.token_mask_from_lengths([1, 3])
    key_padding = masks.to_key_padding_mask(tokens)
    hf = masks.to_hf_attention_mask(tokens)
    assert key_padding.tolist() == [[False, True, True], [False, False, False]]
    assert hf.dtype == torch.int64 and hf.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert torch.equal(masks.from_key_padding_mask(key_padding), tokens)
    assert torch.equal(masks.from_hf_attention_mask(hf), tokens)


def test_combined_mask_with_left_padding_has_empty_rows_for_padding_queries():
    mask = masks.causal_padding_mask(masks.token_mask_from_lengths([2, 3], side="left"))
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].int().tolist() == [[0, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert torch.equal(mask[1, 0], masks.causal_mask(3))


def test_key_mask_agrees_with_multihead_attention_key_padding_mask():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(4, 1, batch_first=True)
    x = torch.randn(2, 3, 4)
    tokens = masks.token_mask_from_lengths([2, 3])
    _, by_key_padding = mha(x, x, x, key_padding_mask=masks.to_key_padding_mask(tokens))
    _, by_attn_mask = mha(x, x, x, attn_mask=~masks.key_mask(tokens)[:, 0].expand(2, 3, 3))
    torch.testing.assert_close(by_key_padding, by_attn_mask)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: masks.causal_mask(0), "size must be a positive int"),
        (lambda: masks.causal_mask(2, n_past=-1), "n_past must be an int >= 0"),
        (lambda: masks.token_mask_from_lengths([2, 5], max_len=4), "max_len=4 is shorter than the longest sequence, 5"),
        (lambda: masks.token_mask_from_lengths([[1, 2]]), "lengths must be a non-empty 1-D sequence"),
        (lambda: masks.token_mask_from_lengths([-1]), "lengths must be >= 0"),
        (lambda: masks.token_mask_from_lengths([1.5]), "lengths must be a non-empty 1-D sequence of ints"),
        (lambda: masks.token_mask_from_lengths([1], side="top"), "side must be one of"),
        (lambda: masks.token_mask_from_ids(torch.ones(3), 0), "input_ids must be an integer tensor of shape"),
        (lambda: masks.token_mask_from_ids(torch.ones(1, 3, dtype=torch.long), None), "pad_id must be an int"),
        (lambda: masks.key_mask(torch.ones(2, 3)), r"token_mask must be a bool tensor of shape \(B, T\)"),
        (lambda: masks.to_key_padding_mask(torch.ones(2, 3, dtype=torch.long)), "token_mask must be a bool tensor"),
        (lambda: masks.to_hf_attention_mask(torch.ones(2, 3)), "token_mask must be a bool tensor"),
        (lambda: masks.causal_padding_mask(torch.ones(2, 3, 3, dtype=torch.bool)), r"token_mask must be .* \(B, T\)"),
        (
            lambda: masks.from_key_padding_mask(torch.ones(3, dtype=torch.bool)),
            "key_padding_mask must be a bool tensor",
        ),
        (
            lambda: masks.from_hf_attention_mask(torch.tensor([[1, 2]])),
            "attention_mask must hold only the integers 0 and 1",
        ),
        (lambda: masks.from_hf_attention_mask(torch.tensor([[True]])), "attention_mask must hold only the integers"),
        (lambda: masks.combine_masks(), "at least one mask"),
        (
            lambda: masks.combine_masks(torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2)),
            r"masks\[1\] must be a bool",
        ),
        (
            lambda: masks.combine_masks(torch.ones(2, 2, dtype=torch.bool), torch.ones(3, 3, dtype=torch.bool)),
            "must broadcast",
        ),
    ],
)
def test_bad_inputs_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


SPECIAL = [0, 1, 2, 3]  # pad, mask, cls, sep in a toy vocabulary


def test_mlm_mask_proportions_and_labels():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 50, (200, 100), generator=gen)
    ids[:, 0] = 2
    batch = masks.mlm_mask(ids, mask_token_id=1, vocab_size=50, special_token_ids=SPECIAL, generator=gen)
    n, selected = ids[:, 1:].numel(), int(batch.selected.sum())
    assert abs(selected / n - 0.15) < 4 * (0.15 * 0.85 / n) ** 0.5
    assert abs(int(batch.replaced_with_mask.sum()) / selected - 0.8) < 4 * (0.8 * 0.2 / selected) ** 0.5
    assert abs(int(batch.replaced_with_random.sum()) / selected - 0.1) < 4 * (0.1 * 0.9 / selected) ** 0.5
    assert not batch.selected[:, 0].any()  # [CLS] is never selected
    assert (batch.labels[~batch.selected] == masks.IGNORE_INDEX).all()
    assert torch.equal(batch.labels[batch.selected], ids[batch.selected])
    assert (batch.input_ids[batch.replaced_with_mask] == 1).all()
    assert not torch.isin(batch.input_ids[batch.replaced_with_random], torch.tensor(SPECIAL)).any()
    unchanged = ~batch.replaced_with_mask & ~batch.replaced_with_random
    assert torch.equal(batch.input_ids[unchanged], ids[unchanged])


def test_mlm_mask_is_seeded():
    ids = torch.randint(4, 50, (4, 30))
    draw = [
        masks.mlm_mask(
            ids, mask_token_id=1, vocab_size=50, special_token_ids=SPECIAL, generator=torch.Generator().manual_seed(7)
        )
        for _ in range(2)
    ]
    assert torch.equal(draw[0].input_ids, draw[1].input_ids) and torch.equal(draw[0].labels, draw[1].labels)


def test_mlm_mask_selects_the_same_positions_as_the_transformers_collator():
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    text = ["the cat sat on the mat because it was warm", "attention is all you need"] * 8
    ids = tokenizer(text, padding=True, return_tensors="pt")["input_ids"]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=3, return_tensors="pt")
    theirs = collator([{"input_ids": row} for row in ids])
    ours = masks.mlm_mask(
        ids,
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        special_token_ids=tokenizer.all_special_ids,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(ours.labels, theirs["labels"])
    assert torch.equal(ours.input_ids == tokenizer.mask_token_id, theirs["input_ids"] == tokenizer.mask_token_id)
    assert torch.equal(ours.input_ids[~ours.replaced_with_random], theirs["input_ids"][~ours.replaced_with_random])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask_token_id": 9}, r"special_token_ids must include mask_token_id=9"),
        ({"vocab_size": 0}, "vocab_size must be a positive int"),
        ({"vocab_size": 10}, r"input_ids must lie in \[0, vocab_size=10\)"),
        ({"special_token_ids": [1, 60]}, "special_token_ids must lie in"),
        ({"mlm_probability": 1.5}, "mlm_probability must be a probability"),
        ({"mask_fraction": 0.95, "random_fraction": 0.1}, "mask_fraction \\+ random_fraction must be <= 1"),
        ({"input_ids": torch.ones(5, dtype=torch.long)}, r"input_ids must be an integer tensor of shape \(B, T\)"),
        ({"vocab_size": 4, "input_ids": torch.ones(1, 3, dtype=torch.long)}, "cover the whole vocabulary"),
    ],
)
def test_mlm_mask_bad_inputs_name_the_argument(kwargs, message):
    args = {
        "input_ids": torch.randint(4, 50, (2, 5)),
        "mask_token_id": 1,
        "vocab_size": 50,
        "special_token_ids": SPECIAL,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        masks.mlm_mask(args.pop("input_ids"), **args)


def test_assets_are_found_offline_and_missing_ones_explain_setup():
    assert (minilm_dir() / "vocab.txt").is_file()
    with pytest.raises(FileNotFoundError, match="run `make setup`"):
        package_dir("no_such_course_asset")
