import json

import pytest

from course_lib.tokenizer import ByteBPE, CharTokenizer, byte_to_char, pretokenize, train_hf_bpe

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


def test_hf_bpe_learns_the_same_merges_ids_and_encodings(bpe):
    hf = train_hf_bpe([TEXT], 256 + 1 + 40, special_tokens=["<|endoftext|>"])
    state = json.loads(hf.backend_tokenizer.to_str())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
    assert merges == bpe.merges and state["model"]["vocab"] == bpe.vocab
    for text in (UNICODE, TEXT[:200], ""):
        assert hf(text)["input_ids"] == bpe.encode(text)
        assert hf.decode(hf(text)["input_ids"]) == text


def test_hf_bpe_gives_special_tokens_their_roles():
    hf = train_hf_bpe([TEXT], 300, special_tokens=["[PAD]", "[MASK]", "[CLS]", "[SEP]", "[UNK]"])
    assert (hf.pad_token, hf.mask_token, hf.cls_token, hf.sep_token) == ("[PAD]", "[MASK]", "[CLS]", "[SEP]")
    assert hf.convert_tokens_to_ids("[MASK]") == 1


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
