"""Tokenizers: characters, and byte-level BPE written out by hand, checked against the `tokenizers` library.

Byte-level BPE (GPT-2's): the text is split into words by GPT-2's regular expression (on the Unicode
characters: it matches letters and digits), each word is written as its UTF-8 bytes, each byte shown as one
printable character (so a space is "Ġ"), then the most frequent adjacent pair of symbols is merged into a new
symbol, again and again, until the vocabulary has the size asked for. Because every byte is in the base
vocabulary, any Unicode text round-trips and no character is ever unknown.

Special tokens (`<|endoftext|>`, `[MASK]`, ...) are cut out of the text first, longest first, in training and
in encoding: each becomes its single id, and no merge is ever learned from a piece of one.

`ByteBPE.train` follows the `tokenizers` library's trainer exactly (the same ids, the same merge order,
ties broken towards the smallest pair of ids), so `train_hf_bpe` on the same text gives the same merges. Like
that trainer it counts every pair once, then after each merge re-counts only the words that contained the
merged pair; chapter 04 shows the plain loop that recounts everything, which learns the same merges, slowly
(`benchmarks/tokenizer_train.py` times both).
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import regex
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:  # transformers takes most of a second to import; only train_hf_bpe needs it
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


def _check_specials(special_tokens: Sequence[str]) -> tuple[str, ...]:
    if isinstance(special_tokens, str):
        raise TypeError("special_tokens must be a sequence of strings, not one str")
    specials = tuple(special_tokens)
    if any(not isinstance(s, str) or not s for s in specials) or len(set(specials)) != len(specials):
        raise ValueError(f"special_tokens must be distinct non-empty strings, got {list(specials)!r}")
    return specials


@cache
def _special_pattern(specials: tuple[str, ...]) -> regex.Pattern:
    # Longest first, so where "<|end|>" and "<|endoftext|>" start at the same place the longer one wins.
    alternatives = sorted(specials, key=len, reverse=True)
    return regex.compile("(" + "|".join(regex.escape(s) for s in alternatives) + ")")


def split_on_special_tokens(text: str, special_tokens: Sequence[str]) -> list[str]:
    """`text` cut at its special tokens, the leftmost first, the longest where several start at one place:
    [text, special, text, ..., special, text]. Even positions hold ordinary text (maybe empty), odd ones
    special tokens, which are never pre-tokenized, merged or split (what `tokenizers` does with them)."""
    _check_text("text", text)
    specials = _check_specials(special_tokens)
    return _special_pattern(specials).split(text) if specials else [text]


def pretokenize(text: str) -> list[str]:
    """GPT-2's split into words, each written with the byte characters of its UTF-8 bytes."""
    table = byte_to_char()
    return ["".join(table[b] for b in word.encode("utf-8")) for word in GPT2_SPLIT.findall(_check_text("text", text))]


@dataclass
class ByteBPE:
    """A byte-level BPE vocabulary: token -> id, the merges in the order they were learned, and the special
    tokens (each in `vocab`) that encoding keeps whole."""

    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    special_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.special_tokens = _check_specials(self.special_tokens)
        missing = [s for s in self.special_tokens if s not in self.vocab]
        if missing:
            raise ValueError(f"special_tokens must be in vocab; missing {missing!r}")

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        special_tokens: Sequence[str] = (),
        on_merge: Callable[[int, tuple[str, str], int], None] | None = None,
    ) -> ByteBPE:
        """Learn merges from `text` until the vocabulary (specials + 256 bytes + merges) has `vocab_size`
        tokens or no pair occurs twice. Special tokens are cut out of `text` first, so no merge is learned
        from their characters. `on_merge(rank, pair, count)` sees every merge as it is made."""
        specials = _check_specials(special_tokens)
        alphabet = sorted(byte_to_char().values())
        if not isinstance(vocab_size, int) or vocab_size < len(specials) + len(alphabet):
            raise ValueError(f"vocab_size must be an int >= {len(specials) + len(alphabet)} (specials + 256 bytes)")
        vocab = {token: i for i, token in enumerate([*specials, *alphabet])}
        pieces = split_on_special_tokens(text, specials)[::2]  # the ordinary text between special tokens
        word_counts = Counter(word for piece in pieces for word in pretokenize(piece))
        merges = _learn_merges(word_counts, vocab, vocab_size, on_merge)
        return cls(vocab, merges, specials)

    def encode(self, text: str) -> list[int]:
        """Each special token becomes its id; in the text between them, the learned merges are applied
        inside each word, earliest first."""
        ranks = self._ranks()
        ids: list[int] = []
        for position, piece in enumerate(split_on_special_tokens(text, self.special_tokens)):
            if position % 2:
                ids.append(self.vocab[piece])
                continue
            for word in pretokenize(piece):
                symbols = list(word)
                while len(symbols) > 1:
                    neighbours = zip(symbols, symbols[1:], strict=False)
                    rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(neighbours))
                    if rank == len(ranks):
                        break
                    symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
                ids.extend(self.vocab[s] for s in symbols)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Symbols to bytes to text (a cut UTF-8 sequence becomes U+FFFD). Special tokens come back as their
        text, or are left out with `skip_special_tokens=True`, as in `transformers`."""
        tokens = self._tokens()
        ids = [int(i) for i in ids]
        if any(not 0 <= i < len(tokens) for i in ids):
            raise ValueError(f"ids must lie in [0, vocab_size={len(tokens)})")
        to_byte = {c: b for b, c in byte_to_char().items()}
        specials = set(self.special_tokens)
        parts = []
        for token in (tokens[i] for i in ids):
            if token not in specials:
                parts.append(bytes(to_byte[c] for c in token))
            elif not skip_special_tokens:
                parts.append(token.encode("utf-8"))
        return b"".join(parts).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _ranks(self) -> dict[tuple[str, str], int]:
        return {pair: rank for rank, pair in enumerate(self.merges)}

    def _tokens(self) -> list[str]:
        return sorted(self.vocab, key=self.vocab.__getitem__)


def _learn_merges(
    word_counts: Counter[str],
    vocab: dict[str, int],
    vocab_size: int,
    on_merge: Callable[[int, tuple[str, str], int], None] | None,
) -> list[tuple[str, str]]:
    """The merge loop with incremental counts: adds the new tokens to `vocab`, returns the merges.

    Recounting every pair after every merge costs (all words) x (merges). Instead, count once and keep
    `where` (pair -> the words that contain it); per merge, re-count only those words, their old pairs out
    and their new pairs in. A heap finds the most frequent pair (ties: the smallest ids); every change of a
    count pushes a fresh entry, and an entry whose count no longer matches is stale and skipped.
    """
    words = [[vocab[c] for c in word] for word in word_counts]  # each distinct word once, as symbol ids
    freqs = list(word_counts.values())
    tokens = sorted(vocab, key=vocab.__getitem__)
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in zip(word, word[1:], strict=False):
            pair_counts[pair] += freq
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size and heap:
        negative_count, best = heapq.heappop(heap)
        if pair_counts.get(best) != -negative_count:
            continue
        if -negative_count < 2:
            break
        merged = tokens[best[0]] + tokens[best[1]]
        if merged not in vocab:  # a+bc after ab+c builds no new token: `tokenizers` keeps the first id
            vocab[merged] = len(tokens)
            tokens.append(merged)
        merges.append((tokens[best[0]], tokens[best[1]]))
        if on_merge is not None:
            on_merge(len(merges), merges[-1], -negative_count)
        change: Counter[tuple[int, int]] = Counter()
        for w in where.pop(best):
            old, freq = words[w], freqs[w]
            words[w] = new = _merge_pair(old, best, vocab[merged])
            for pair in zip(old, old[1:], strict=False):
                change[pair] -= freq
            for pair in zip(new, new[1:], strict=False):
                change[pair] += freq
                where[pair].add(w)
        for pair, delta in change.items():
            if delta:
                pair_counts[pair] += delta
                if pair_counts[pair] > 0:
                    heapq.heappush(heap, (-pair_counts[pair], pair))
                else:
                    del pair_counts[pair]
    return merges


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
    `transformers`. Special tokens named [PAD], [MASK], [CLS], [SEP], [UNK] and <|endoftext|> get the roles
    pad, mask, cls, sep, unk and eos (`tokenizer.eos_token` is then "<|endoftext|>").

    The texts are cut at special tokens before training, as `ByteBPE.train` does: `tokenizers`' trainer
    would otherwise learn merges from their characters ("<|", "|>", ...)."""
    specials = _check_specials(special_tokens)
    if not isinstance(vocab_size, int) or vocab_size < len(specials) + 256:
        raise ValueError(f"vocab_size must be an int >= {len(specials) + 256} (specials + 256 bytes)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    pieces = (piece for text in texts for piece in split_on_special_tokens(text, specials)[::2])
    tokenizer.train_from_iterator(pieces, trainer)
    roles = {"[PAD]": "pad_token", "[MASK]": "mask_token", "[CLS]": "cls_token", "[SEP]": "sep_token",
             "[UNK]": "unk_token", "<|endoftext|>": "eos_token"}  # fmt: skip
    named = {roles[s]: s for s in specials if s in roles}
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **named)
