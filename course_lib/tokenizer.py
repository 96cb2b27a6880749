"""Tokenizers: characters, and byte-level BPE written out by hand, checked against the `tokenizers` library.

Byte-level BPE (GPT-2's): text -> UTF-8 bytes, each byte shown as one printable character (so a space is
"Ġ"), split into words by GPT-2's regular expression, then the most frequent adjacent pair of symbols is
merged into a new symbol, again and again, until the vocabulary has the size asked for. Because every byte
is in the base vocabulary, any Unicode text round-trips and no character is ever unknown.

`ByteBPE.train` follows the `tokenizers` library's trainer exactly (the same ids, the same merge order,
ties broken towards the smallest pair of ids), so `train_hf_bpe` on the same text gives the same merges.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import regex
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# GPT-2's pre-tokenizer: contractions, runs of letters, of digits, of other symbols, each with one leading
# space; whitespace kept apart. Merges never cross these boundaries.
GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def _check_text(name: str, text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    return text


class CharTokenizer:
    """One token per character of a fixed alphabet, built from a training text.

    A character the training text never contained has no id. With `unknown=None` encoding it raises; with
    `unknown="�"` (say) it becomes that extra token, so evaluation on new text cannot crash, and decoding
    shows where information was lost.
    """

    def __init__(self, chars: Iterable[str], unknown: str | None = None) -> None:
        chars = list(chars)
        if any(not isinstance(c, str) or len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("chars must be distinct single characters")
        if unknown is not None:
            if not isinstance(unknown, str) or len(unknown) != 1 or unknown in chars:
                raise ValueError(f"unknown must be one character not in chars, got {unknown!r}")
            chars.append(unknown)
        if not chars:
            raise ValueError("chars must not be empty")
        self.chars = chars
        self.unknown = unknown
        self.ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str, unknown: str | None = None) -> CharTokenizer:
        """The sorted set of characters in `text` (sorted, so the same text always gives the same ids)."""
        return cls(sorted(set(_check_text("text", text))), unknown)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        _check_text("text", text)
        if self.unknown is None:
            missing = sorted(set(text) - self.ids.keys())
            if missing:
                raise ValueError(f"text has characters outside the vocabulary: {missing[:10]}; pass unknown=")
            return [self.ids[c] for c in text]
        unknown_id = self.ids[self.unknown]
        return [self.ids.get(c, unknown_id) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"ids must lie in [0, vocab_size={self.vocab_size})")
        return "".join(self.chars[i] for i in ids)


@cache
def byte_to_char() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters: printable Latin-1 bytes stand for
    themselves, the rest (space, control bytes, ...) are shifted to U+0100 and up, so a space is 'Ġ'."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def pretokenize(text: str) -> list[str]:
    """GPT-2's split into words, each written with the byte characters of its UTF-8 bytes."""
    table = byte_to_char()
    return ["".join(table[b] for b in word.encode("utf-8")) for word in GPT2_SPLIT.findall(_check_text("text", text))]


@dataclass
class ByteBPE:
    """A byte-level BPE vocabulary: token -> id, and the merges in the order they were learned."""

    vocab: dict[str, int]
    merges: list[tuple[str, str]]

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        special_tokens: Sequence[str] = (),
        on_merge: Callable[[int, tuple[str, str], int], None] | None = None,
    ) -> ByteBPE:
        """Learn merges from `text` until the vocabulary (specials + 256 bytes + merges) has `vocab_size`
        tokens or no pair occurs twice. `on_merge(rank, pair, count)` sees every merge as it is made."""
        alphabet = sorted(byte_to_char().values())
        if not isinstance(vocab_size, int) or vocab_size < len(special_tokens) + len(alphabet):
            raise ValueError(
                f"vocab_size must be an int >= {len(special_tokens) + len(alphabet)} (specials + 256 bytes)"
            )
        if len(set(special_tokens)) != len(special_tokens) or any(not s for s in special_tokens):
            raise ValueError("special_tokens must be distinct non-empty strings")
        vocab = {token: i for i, token in enumerate([*special_tokens, *alphabet])}
        # Each distinct word once, as a list of symbol ids, weighted by how often it occurs.
        word_counts = Counter(pretokenize(text))
        words = [[vocab[c] for c in word] for word in word_counts]
        counts = list(word_counts.values())
        tokens = list(vocab)
        merges: list[tuple[str, str]] = []
        while len(vocab) < vocab_size:
            pairs: Counter[tuple[int, int]] = Counter()
            for word, count in zip(words, counts, strict=True):
                for pair in zip(word, word[1:], strict=False):
                    pairs[pair] += count
            if not pairs:
                break
            best_count = max(pairs.values())
            if best_count < 2:
                break
            best = min(pair for pair, count in pairs.items() if count == best_count)  # ties: smallest ids
            new_id = len(tokens)
            tokens.append(tokens[best[0]] + tokens[best[1]])
            vocab[tokens[new_id]] = new_id
            merges.append((tokens[best[0]], tokens[best[1]]))
            if on_merge is not None:
                on_merge(len(merges), merges[-1], best_count)
            words = [_merge_pair(word, best, new_id) for word in words]
        return cls(vocab, merges)

    def encode(self, text: str) -> list[int]:
        """Apply the learned merges, earliest first, inside each word."""
        ranks = self._ranks()
        ids: list[int] = []
        for word in pretokenize(text):
            symbols = list(word)
            while len(symbols) > 1:
                neighbours = zip(symbols, symbols[1:], strict=False)
                rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(neighbours))
                if rank == len(ranks):
                    break
                symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
            ids.extend(self.vocab[s] for s in symbols)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        tokens = self._tokens()
        ids = [int(i) for i in ids]
        if any(not 0 <= i < len(tokens) for i in ids):
            raise ValueError(f"ids must lie in [0, vocab_size={len(tokens)})")
        to_byte = {c: b for b, c in byte_to_char().items()}
        data = bytes(to_byte[c] for i in ids if tokens[i] not in self._specials() for c in tokens[i])
        return data.decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _ranks(self) -> dict[tuple[str, str], int]:
        return {pair: rank for rank, pair in enumerate(self.merges)}

    def _tokens(self) -> list[str]:
        return sorted(self.vocab, key=self.vocab.__getitem__)

    def _specials(self) -> set[str]:
        alphabet = set(byte_to_char().values())
        merged = {a + b for a, b in self.merges}
        return {t for t in self.vocab if t not in alphabet and t not in merged}


def _merge_pair(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def train_hf_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """The same byte-level BPE trained by the `tokenizers` library (fast, in Rust) and wrapped for
    `transformers`. Special tokens named like [PAD], [MASK], [CLS], [SEP], [UNK] get those roles."""
    if not isinstance(vocab_size, int) or vocab_size < len(special_tokens) + 256:
        raise ValueError(f"vocab_size must be an int >= {len(special_tokens) + 256} (specials + 256 bytes)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    roles = {"[PAD]": "pad_token", "[MASK]": "mask_token", "[CLS]": "cls_token", "[SEP]": "sep_token",
             "[UNK]": "unk_token", "<|endoftext|>": "eos_token"}  # fmt: skip
    named = {roles[s]: s for s in special_tokens if s in roles}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **named)
