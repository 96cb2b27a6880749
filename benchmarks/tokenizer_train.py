"""Byte-level BPE training: the library's incremental trainer against the plain loop that recounts every pair.

`course_lib.tokenizer.ByteBPE.train` counts pairs once, then after each merge re-counts only the words that
contained the merged pair. The plain loop (chapter 04's lesson, repeated here) recounts every pair of every
word after every merge. Both must learn the same merges, and so must the `tokenizers` library (Rust), which
is timed alongside. Timings are printed, never asserted; the merges are checked and a difference fails.
Run: `.venv/bin/python benchmarks/tokenizer_train.py [--chars 130000 --merges 500]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable

from course_lib.data import shakespeare_corpus
from course_lib.tokenizer import ByteBPE, byte_to_char, pretokenize, train_hf_bpe


def recount_every_pair(text: str, vocab_size: int) -> list[tuple[str, str]]:
    """The textbook loop: after every merge, count every adjacent pair of every distinct word again."""
    symbols = sorted(byte_to_char().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    word_counts = Counter(pretokenize(text))
    words = [[vocab[c] for c in word] for word in word_counts]
    counts = list(word_counts.values())
    merges = []
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[int, int]] = Counter()
        for word, count in zip(words, counts, strict=True):
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        best_count = max(pairs.values(), default=0)
        if best_count < 2:
            break
        best = min(pair for pair, count in pairs.items() if count == best_count)
        merged = symbols[best[0]] + symbols[best[1]]
        if merged not in vocab:
            vocab[merged] = len(symbols)
            symbols.append(merged)
        merges.append((symbols[best[0]], symbols[best[1]]))
        words = [_replace(word, best, vocab[merged]) for word in words]
    return merges


def _replace(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def hf_merges(text: str, vocab_size: int) -> list[tuple[str, str]]:
    state = json.loads(train_hf_bpe([text], vocab_size).backend_tokenizer.to_str())
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]


def timed(fn: Callable[[], list[tuple[str, str]]], repeats: int) -> tuple[float, list[tuple[str, str]]]:
    """Median wall time over `repeats` runs, and the merges of the last one."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        merges = fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=130_000, help="characters of the training text to use")
    parser.add_argument("--merges", type=int, default=500, help="merges to learn")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each fast trainer (the median is printed)")
    args = parser.parse_args()
    text = shakespeare_corpus().train[: args.chars]
    vocab_size = 256 + args.merges
    print(f"training text: the first {len(text):,} characters of the course corpus "
          f"({len(text.encode('utf-8')):,} bytes, {len(pretokenize(text)):,} words), {args.merges} merges")  # fmt: skip
    fast_s, fast = timed(lambda: ByteBPE.train(text, vocab_size).merges, args.repeats)
    slow_s, slow = timed(lambda: recount_every_pair(text, vocab_size), 1)
    rust_s, rust = timed(lambda: hf_merges(text, vocab_size), args.repeats)
    print(f"  ByteBPE.train (incremental counts): {fast_s:7.3f} s  (median of {args.repeats})")
    print(f"  recount every pair after each merge: {slow_s:7.3f} s  ({slow_s / fast_s:.0f}x slower)")
    print(f"  tokenizers (Rust), for reference:    {rust_s:7.3f} s  (median of {args.repeats})")
    for name, merges in (("the recount loop", slow), ("tokenizers", rust)):
        if merges != fast:
            first = next((i for i, (a, b) in enumerate(zip(fast, merges, strict=False)) if a != b), None)
            raise SystemExit(f"{name} learns other merges than ByteBPE.train: {len(merges)} merges against "
                             f"{len(fast)}, first difference at merge {first}")  # fmt: skip
    print(f"  all three learn the same {len(fast)} merges, in the same order")


if __name__ == "__main__":
    main()
