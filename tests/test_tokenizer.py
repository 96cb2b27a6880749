import json
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from course_lib.tokenizer import (
    ByteBPE,
    CharTokenizer,
    byte_to_char,
    pretokenize,
    split_on_special_tokens,
    train_hf_bpe,
)

UNICODE = "Hello, wörld! Ünïcödé 東京 🙂 12345 — tabs\tand\nnewlines  ok"
TEXT = ("to be or not to be that is the question whether tis nobler in the mind to suffer " * 20) + UNICODE


def test_char_tokenizer_round_trip_and_stable_ids():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == sorted(set("hello world")) and tok.vocab_size == 8
    assert tok.decode(tok.encode("hello")) == "hello"
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_char_tokenizer_unknown_characters_raise_or_map_to_the_unknown_token():
    strict = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"outside the vocabulary: \['z'\]"):
        strict.encode("abz")
    lenient = CharTokenizer.from_text("abc", unknown="?")
    assert lenient.vocab_size == 4 and lenient.decode(lenient.encode("abz")) == "ab?"


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: CharTokenizer(["a", "a"]), ValueError, "distinct single characters"),
        (lambda: CharTokenizer(["ab"]), ValueError, "distinct single characters"),
        (lambda: CharTokenizer([]), ValueError, "chars must not be empty"),
        (lambda: CharTokenizer(["a"], unknown="a"), ValueError, "unknown must be one character not in chars"),
        (lambda: CharTokenizer.from_text(b"bytes"), TypeError, "text must be a str"),
        (lambda: CharTokenizer.from_text("ab").decode([5]), ValueError, r"ids must lie in \[0, vocab_size=2\)"),
    ],
)
def test_char_tokenizer_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_byte_map_covers_every_byte_with_a_printable_character():
    table = byte_to_char()
    assert len(set(table.values())) == 256 and table[ord(" ")] == "Ġ" and table[ord("a")] == "a"
    assert all(c.isprintable() for c in table.values())


def test_pretokenize_keeps_spaces_with_the_following_word():
    assert pretokenize("Hello world, 42!") == ["Hello", "Ġworld", ",", "Ġ42", "!"]
    assert pretokenize("") == []


@pytest.fixture(scope="module")
def bpe():
    return ByteBPE.train(TEXT, 256 + 1 + 40, special_tokens=["<|endoftext|>"])


def test_bpe_learns_frequent_pairs_first(bpe):
    assert len(bpe.merges) == 40 and bpe.vocab_size == 297
    assert bpe.vocab["<|endoftext|>"] == 0
    assert ("Ġ", "t") in bpe.merges[:5]  # " t" starts "to", "that", "the", "tis"


@pytest.mark.parametrize("text", [UNICODE, "", "   ", "\n\n", "zzz never seen ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", TEXT[:300]])
def test_bpe_round_trips_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_compresses_the_text_it_was_trained_on(bpe):
    sample = TEXT[:500]
    assert len(bpe.encode(sample)) < 0.6 * len(sample.encode("utf-8"))


def test_bpe_reports_every_merge():
    seen = []
    ByteBPE.train("aaab aaab aaab", 256 + 3, on_merge=lambda rank, pair, count: seen.append((rank, pair, count)))
    # after 'aa', the pairs ('aa', 'a') and ('a', 'b') both occur 3 times: the tie goes to the smaller ids,
    # and 'a' (a byte) has a smaller id than 'aa' (the first merge)
    assert seen == [(1, ("a", "a"), 6), (2, ("a", "b"), 3), (3, ("aa", "ab"), 3)]


def hf_merges_and_vocab(hf):
    state = json.loads(hf.backend_tokenizer.to_str())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
    return merges, state["model"]["vocab"]


def test_hf_bpe_learns_the_same_merges_ids_and_encodings(bpe):
    hf = train_hf_bpe([TEXT], 256 + 1 + 40, special_tokens=["<|endoftext|>"])
    assert hf_merges_and_vocab(hf) == (bpe.merges, bpe.vocab)
    for text in (UNICODE, TEXT[:200], ""):
        assert hf(text)["input_ids"] == bpe.encode(text)
        assert hf.decode(hf(text)["input_ids"]) == text


def test_hf_bpe_gives_special_tokens_their_roles():
    hf = train_hf_bpe([TEXT], 300, special_tokens=["[PAD]", "[MASK]", "[CLS]", "[SEP]", "[UNK]", "<|endoftext|>"])
    roles = (hf.pad_token, hf.mask_token, hf.cls_token, hf.sep_token, hf.unk_token, hf.eos_token)
    assert roles == ("[PAD]", "[MASK]", "[CLS]", "[SEP]", "[UNK]", "<|endoftext|>")
    assert hf.convert_tokens_to_ids("[MASK]") == 1 and hf.eos_token_id == 5


@pytest.mark.parametrize("seed", range(40))
def test_incremental_training_matches_tokenizers_on_repetitive_text(seed):
    # few letters and long runs ("aaaa", "abab") make overlapping pairs and many ties: where counting
    # only the changed words could go wrong
    rng = random.Random(seed)
    words = ["".join(rng.choice("ab" if seed % 2 else "abc") for _ in range(rng.randint(1, 9))) for _ in range(20)]
    text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 200)))
    vocab_size = 256 + rng.randint(1, 60)
    ours = ByteBPE.train(text, vocab_size)
    assert (ours.merges, ours.vocab) == hf_merges_and_vocab(train_hf_bpe([text], vocab_size))


# Overlapping specials: "<|end|>" and "<|endoftext|>" share "<|end"; "[MASK]" lies inside "[[MASK]]" and begins
# "[MASK][SEP]", so where "[MASK][SEP]" starts both match. Passed shorter first, so the longest-first rule
# cannot come from their order.
SPECIALS = ["<|end|>", "[MASK]", "<|endoftext|>", "[[MASK]]", "[MASK][SEP]"]
DOCUMENTS = [
    "the end of the play.",
    "Exit, pursued by a bear. The end",
    "ACT I. The [MASK] of Denmark",
    "the end! the end? the [[MASK]] of it",
    "[MASK][SEP] the [MASK] [SEP]",
]
TEXT_WITH_SPECIALS = "<|endoftext|>".join(DOCUMENTS * 5) + "<|end|> end|> [MASK] <|endoftext|>" * 10


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("a<|endoftext|>b", ["a", "<|endoftext|>", "b"]),
        ("a<|end|>b<|end", ["a", "<|end|>", "b<|end"]),
        ("<|end|><|endoftext|>", ["", "<|end|>", "", "<|endoftext|>", ""]),
        ("x[[MASK]]y [MASK]", ["x", "[[MASK]]", "y ", "[MASK]", ""]),
        ("[[MASK]", ["[", "[MASK]", ""]),
        ("[MASK][SEP]x[MASK] [SEP]", ["", "[MASK][SEP]", "x", "[MASK]", " [SEP]"]),
        ("[[MASK]][SEP]", ["", "[[MASK]]", "[SEP]"]),
        ("no specials", ["no specials"]),
    ],
)
def test_split_on_special_tokens_takes_the_longest_at_each_place(text, pieces):
    assert split_on_special_tokens(text, SPECIALS) == pieces


@pytest.fixture(scope="module")
def bpe_with_specials():
    return ByteBPE.train(TEXT_WITH_SPECIALS, len(SPECIALS) + 256 + 60, special_tokens=SPECIALS)


@pytest.fixture(scope="module")
def hf_with_specials():
    return train_hf_bpe([TEXT_WITH_SPECIALS], len(SPECIALS) + 256 + 60, special_tokens=SPECIALS)


def ordinary_words(text):
    return {word for piece in split_on_special_tokens(text, SPECIALS)[::2] for word in pretokenize(piece)}


def test_bpe_never_learns_a_merge_from_a_special_token(bpe_with_specials, hf_with_specials):
    words = ordinary_words(TEXT_WITH_SPECIALS)
    assert all(any(a + b in word for word in words) for a, b in bpe_with_specials.merges)
    assert hf_merges_and_vocab(hf_with_specials) == (bpe_with_specials.merges, bpe_with_specials.vocab)


def test_tokenizers_own_trainer_would_learn_merges_from_special_tokens():
    # why train_hf_bpe cuts the texts first: fed whole, the Rust trainer learns tokens found only in specials
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(SPECIALS) + 256 + 60, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=alphabet, show_progress=False)  # fmt: skip
    tokenizer.train_from_iterator([TEXT_WITH_SPECIALS], trainer)
    words = ordinary_words(TEXT_WITH_SPECIALS)
    learned = set(tokenizer.get_vocab()) - set(SPECIALS) - set(alphabet)
    assert [t for t in learned if not any(t in word for word in words)]


SPECIAL_CASES = [
    "doc one<|endoftext|>doc two<|endoftext|>",
    "a<|end|>b<|endoftext|>c [MASK] d[[MASK]]e",
    "<|end|><|endoftext|><|end|>",
    "[[MASK] and [MASK]] and [[[MASK]]]",
    "[MASK][SEP][MASK] [SEP] [MASK][SEP [[MASK]][SEP]",
    "almost: <|end <|endoftext|| <|end of text|> [mask]",
    "the end of the play.<|endoftext|>ACT I. The [MASK] of Denmark 東京 🙂",
]


@pytest.mark.parametrize("text", SPECIAL_CASES)
def test_bpe_encodes_special_tokens_as_tokenizers_does(bpe_with_specials, hf_with_specials, text):
    ids = bpe_with_specials.encode(text)
    assert ids == hf_with_specials(text)["input_ids"]
    assert bpe_with_specials.decode(ids) == hf_with_specials.decode(ids) == text
    assert bpe_with_specials.decode(ids, skip_special_tokens=True) == hf_with_specials.decode(
        ids, skip_special_tokens=True
    )


def test_each_special_token_is_its_single_id_between_documents(bpe_with_specials):
    end = bpe_with_specials.vocab["<|endoftext|>"]
    encoded = [bpe_with_specials.encode(d) for d in DOCUMENTS]
    joined = [i for ids in encoded for i in [*ids, end]]
    assert bpe_with_specials.encode("<|endoftext|>".join(DOCUMENTS) + "<|endoftext|>") == joined
    assert [bpe_with_specials.vocab[s] for s in SPECIALS] == [0, 1, 2, 3, 4]
    assert bpe_with_specials.encode("[[MASK]][MASK]<|end|>[MASK][SEP]") == [3, 1, 0, 4]


def test_bpe_decode_can_skip_special_tokens(bpe_with_specials):
    ids = bpe_with_specials.encode("one<|endoftext|>two [MASK]")
    assert bpe_with_specials.decode(ids, skip_special_tokens=True) == "onetwo "


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: ByteBPE({"a": 0}, [], special_tokens=["<s>"]), ValueError, "special_tokens must be in vocab"),
        (lambda: ByteBPE.train("abc", 300, special_tokens="<s>"), TypeError, "sequence of strings, not one str"),
        (lambda: split_on_special_tokens("abc", ["", "x"]), ValueError, "distinct non-empty strings"),
        (lambda: split_on_special_tokens(3, ["x"]), TypeError, "text must be a str"),
    ],
)
def test_special_tokens_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ByteBPE.train("abc", 100), r"vocab_size must be an int >= 256"),
        (lambda: ByteBPE.train("abc", 300, special_tokens=["x", "x"]), "special_tokens must be distinct"),
        (lambda: ByteBPE.train("abc", 300).decode([999]), r"ids must lie in \[0, vocab_size="),
        (lambda: train_hf_bpe(["abc"], 257, special_tokens=["a", "b"]), r"vocab_size must be an int >= 258"),
    ],
)
def test_bpe_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bpe_training_stops_when_no_pair_repeats():
    assert ByteBPE.train("abcdef", 400).merges == []
    with pytest.raises(TypeError, match="text must be a str"):
        ByteBPE.train(None, 300)
