import pytest
import torch

from course_lib import data
from course_lib.data import (
    cache_path,
    clean_work,
    eval_batches,
    get_batch,
    published_figures,
    random_batches,
    shakespeare_corpus,
    shakespeare_works,
)


def test_the_corpus_is_the_42_works_cleaned_of_front_matter():
    works = shakespeare_works()
    assert len(works) == 42
    hamlet = next(w for w in works if w.name == "hamlet")
    assert hamlet.text.startswith("ACT I.\n\nScene I. Elsinore.")
    assert all("by William Shakespeare" not in w.text[:300] for w in works)
    assert not any("PERSONS REPRESENTED" in w.text or "Dramatis Personae" in w.text[:2000] for w in works)
    assert all(w.text.endswith("\n") and not w.text.endswith("\n\n") for w in works)


def test_split_is_by_work_fixed_and_roughly_ninety_ten():
    corpus = shakespeare_corpus()
    assert corpus.val_works == ("henry_v", "macbeth", "rape_of_lucrece", "twelfth_night")
    assert len(corpus.train_works) == 38 and not set(corpus.train_works) & set(corpus.val_works)
    share = len(corpus.val) / (len(corpus.train) + len(corpus.val))
    assert 0.08 < share < 0.12
    assert set(corpus.val) <= set(corpus.train)  # every validation character is in the training vocabulary


def test_clean_work_drops_title_persons_and_setting():
    raw = "A PLAY\n\nby William Shakespeare\n\n\nPERSONS REPRESENTED.\n\nKING.\n\nSCENE: Here.\n\n"
    raw += "ACT I.\n\nKING.\nHail!  \n"
    assert clean_work(raw) == "ACT I.\n\nKING.\nHail!\n"
    assert clean_work("SONNETS\nby William Shakespeare\n\n\nI\n\nFrom fairest\n") == "I\n\nFrom fairest\n"


@pytest.mark.parametrize(
    ("raw", "message"),
    [("no byline here", "raw must be a work"), ("T\nby William Shakespeare\nDramatis Personae\nX\n", "no act")],
)
def test_clean_work_rejects_text_it_does_not_understand(raw, message):
    with pytest.raises(ValueError, match=message):
        clean_work(raw)


def test_missing_package_explains_how_to_install(monkeypatch):
    monkeypatch.setattr(data, "package_dir", lambda *a: (_ for _ in ()).throw(FileNotFoundError("run `make setup`")))
    data.shakespeare_works.cache_clear()
    with pytest.raises(FileNotFoundError, match="make setup"):
        data.shakespeare_works()
    monkeypatch.undo()
    data.shakespeare_works.cache_clear()


def test_get_batch_targets_are_the_inputs_shifted_by_one():
    tokens = torch.arange(100)
    x, y = get_batch(tokens, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)


def test_random_batches_are_seeded_and_eval_batches_fixed():
    tokens = torch.arange(1000, dtype=torch.int16)
    a, b = random_batches(tokens, 2, 5, seed=3), random_batches(tokens, 2, 5, seed=3)
    assert all(torch.equal(next(a)[0], next(b)[0]) for _ in range(3))
    first, second = eval_batches(tokens, 2, 5, 3), eval_batches(tokens, 2, 5, 3)
    assert len(first) == 3 and all(torch.equal(f[0], s[0]) for f, s in zip(first, second, strict=True))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.arange(10.0), 2, 3), "data must be a 1-D integer tensor"),
        ((torch.arange(10).view(2, 5), 2, 3), "data must be a 1-D integer tensor"),
        ((torch.arange(10), 0, 3), "batch_size must be a positive int"),
        ((torch.arange(10), 2, 10), r"block_size=10 needs 11"),
    ],
)
def test_batches_reject_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        get_batch(*args)
    with pytest.raises(ValueError, match=message):
        next(random_batches(*args))


def test_eval_batches_needs_a_count():
    with pytest.raises(ValueError, match="n_batches must be a positive int"):
        eval_batches(torch.arange(100), 2, 5, 0)


def test_cache_path_is_under_data_cache_and_checks_the_name():
    path = cache_path("probe.txt")
    assert path.parent.name == "cache" and path.parent.parent.name == "data" and path.parent.is_dir()
    for bad in ("", "../x", ".hidden", 3):
        with pytest.raises(ValueError, match="name must be a plain file name"):
            cache_path(bad)


def test_published_figures_each_keep_their_source():
    figures = published_figures()
    entries = [*figures["models"].values(), *figures["trainings"].values(), figures["zero_figure_1"],
               *figures["interconnects_bytes_per_s"].values(), figures["a100_bf16_dense_flops"]]
    assert all(isinstance(e.get("source"), str) and len(e["source"]) > 20 for e in entries)
    assert {"GPT-2 small", "LLaMA-2 7B", "LLaMA-2 70B", "GPT-3 175B"} <= figures["models"].keys()
    for training in figures["trainings"].values():  # a published layout must use exactly its GPUs
        assert training["tp"] * training["pp"] * training["dp"] == training["gpus"]
