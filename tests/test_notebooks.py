"""Checks that keep the course honest: every chapter is executed, stored, navigable and proves its claims.

nbval (run by `make test` on notebooks/) re-executes them; these tests check what nbval does not.
"""

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CONTENTS = NOTEBOOKS / "00_contents.ipynb"
CHAPTERS = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb") if p != CONTENTS)
KERNEL = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["course"]["kernel-name"]
LINK = re.compile(r"\]\(([^)\s]+)\)")
CLAIM_CALL = re.compile(r"\b(claim|refute|claim_at_least|claim_at_most|claim_between)\(")


def load(path):
    return json.loads(path.read_text())


def source(cell):
    return "".join(cell["source"])


def code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def chapter_ids(paths):
    return [p.stem for p in paths]


def test_there_are_chapters_and_a_contents_page():
    assert CONTENTS.is_file() and len(CHAPTERS) >= 2


@pytest.mark.parametrize("path", CHAPTERS, ids=chapter_ids(CHAPTERS))
def test_outputs_are_stored_without_errors(path):
    cells = code_cells(load(path))
    assert any(c["outputs"] for c in cells), "no stored outputs: run `make course`"
    errors = [source(c)[:60] for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"stored error outputs in cells starting {errors}"


@pytest.mark.parametrize("path", CHAPTERS, ids=chapter_ids(CHAPTERS))
def test_execution_counts_run_in_order_from_one(path):
    counts = [c["execution_count"] for c in code_cells(load(path))]
    assert counts == list(range(1, len(counts) + 1)), "execute the notebook top to bottom with `make course`"


@pytest.mark.parametrize("path", CHAPTERS, ids=chapter_ids(CHAPTERS))
def test_first_cell_has_title_navigation_and_learning_goals(path):
    first = load(path)["cells"][0]
    text = source(first)
    number = path.name[:2]
    assert first["cell_type"] == "markdown"
    assert re.match(rf"# {number} · \S", text), f"the first line must be the title '# {number} · ...'"
    assert "(00_contents.ipynb)" in text, "the first cell must link to the contents"
    previous = CHAPTERS[CHAPTERS.index(path) - 1].name if CHAPTERS.index(path) > 0 else CONTENTS.name
    assert f"({previous})" in text, f"the first cell must link to the previous chapter, {previous}"
    assert "**Learning goals.**" in text


@pytest.mark.parametrize("path", CHAPTERS, ids=chapter_ids(CHAPTERS))
def test_ends_with_summary_exercises_solutions_and_next_link(path):
    nb = load(path)
    markdown = "\n".join(source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "## Summary" in markdown and "## Exercises" in markdown
    assert any("solution" in c["metadata"].get("tags", []) for c in code_cells(nb)), "exercises need solution cells"
    last = source(nb["cells"][-1])
    assert nb["cells"][-1]["cell_type"] == "markdown" and "Next:" in last
    later = CHAPTERS[CHAPTERS.index(path) + 1 :]
    if later:
        assert f"({later[0].name})" in last, f"the last cell must link to the next chapter, {later[0].name}"


@pytest.mark.parametrize("path", CHAPTERS, ids=chapter_ids(CHAPTERS))
def test_key_claims_are_asserted_with_claim(path):
    calls = sum(len(CLAIM_CALL.findall(source(c))) for c in code_cells(load(path)))
    assert calls >= 3, f"only {calls} claim(...) calls: a chapter asserts at least three key claims"


@pytest.mark.parametrize("path", [*CHAPTERS, CONTENTS], ids=chapter_ids([*CHAPTERS, CONTENTS]))
def test_no_cell_is_skipped_by_nbval(path):
    assert not [source(c)[:60] for c in load(path)["cells"] if "NBVAL_SKIP" in source(c)]


@pytest.mark.parametrize("path", [*CHAPTERS, CONTENTS], ids=chapter_ids([*CHAPTERS, CONTENTS]))
def test_relative_links_resolve(path):
    for cell in load(path)["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        for target in LINK.findall(source(cell)):
            if "://" in target or target.startswith("#"):
                continue
            assert (path.parent / target.split("#")[0]).exists(), f"{path.name} links to missing {target}"


@pytest.mark.parametrize("path", [*CHAPTERS, CONTENTS], ids=chapter_ids([*CHAPTERS, CONTENTS]))
def test_notebooks_use_the_course_kernel(path):
    assert load(path)["metadata"]["kernelspec"]["name"] == KERNEL


def test_contents_links_every_chapter():
    text = "\n".join(source(c) for c in load(CONTENTS)["cells"])
    missing = [p.name for p in CHAPTERS if f"({p.name})" not in text]
    assert not missing, f"00_contents.ipynb does not link {missing}"
