"""Stored outputs are the lesson: each rule here is one a reader of a saved notebook would notice broken.

No stderr, no path of the machine that ran it, no wall of text, progress bars that show how they ended,
solutions that do not give their answer away, claims that show numbers rather than a bare True.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CHAPTERS = [p for p in NOTEBOOKS if not p.name.startswith("00_")]
MACHINE_PATH = re.compile(r"(?<![\w.~-])(/(tmp|root|home|work|Users|usr|var|opt|private|mnt|proc)/|[A-Z]:\\\\)")
LONGEST_TEXT = 4_000  # characters in one stored output
UNFINISHED_BAR = re.compile(r"(?<!\d)0%\|")


def outputs(path):
    """(cell index, output, its text) for every stored output of a notebook."""
    cells = json.loads(path.read_text())["cells"]
    for index, cell in enumerate(cells):
        for output in cell.get("outputs", []):
            text = "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
            yield index, output, text


def ids(paths):
    return [p.stem for p in paths]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_no_stderr_is_stored(path):
    found = [(i, text[:80]) for i, output, text in outputs(path) if output.get("name") == "stderr"]
    assert not found, f"stderr stored in cells {found}: silence the warning or log at its source"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_no_machine_path_is_stored(path):
    found = [(i, m.group(0), text[max(0, m.start() - 40) : m.end() + 40])
             for i, _, text in outputs(path) for m in [MACHINE_PATH.search(text)] if m]
    assert not found, f"absolute paths stored: {found}: print paths relative to the project or a run folder"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_no_stored_text_is_a_wall(path):
    found = [(i, len(text)) for i, _, text in outputs(path) if len(text) > LONGEST_TEXT]
    assert not found, f"outputs longer than {LONGEST_TEXT} characters (cell, length): {found}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_progress_bars_store_their_final_state(path):
    found = [(i, text[:80]) for i, _, text in outputs(path) if UNFINISHED_BAR.search(text)]
    assert not found, f"progress bars stored at 0% in cells {found}: use course_lib.progress.progress"


@pytest.mark.parametrize("path", CHAPTERS, ids=ids(CHAPTERS))
def test_solutions_hide_their_code_and_their_answers(path):
    cells = json.loads(path.read_text())["cells"]
    shown = [i for i, c in enumerate(cells) if "solution" in c["metadata"].get("tags", [])
             and not (c["metadata"].get("jupyter", {}).get("source_hidden")
                      and c["metadata"].get("jupyter", {}).get("outputs_hidden"))]
    assert not shown, f"solution cells {shown} need metadata jupyter.source_hidden and jupyter.outputs_hidden"


@pytest.mark.parametrize("path", CHAPTERS, ids=ids(CHAPTERS))
def test_at_most_one_claim_in_five_is_a_bare_boolean(path):
    lines = [line for _, _, text in outputs(path) for line in text.splitlines() if line.startswith("✓ ")]
    yes_no = [line for line in lines if line.endswith("(yes/no)")]
    assert lines, "no claim output stored: run `make course`"
    assert 5 * len(yes_no) <= len(lines), (
        f"{len(yes_no)} of {len(lines)} claims are bare yes/no: claim the number behind each "
        f"(claim_at_least, claim_at_most, claim_between): {yes_no}"
    )


@pytest.mark.parametrize("path", CHAPTERS, ids=ids(CHAPTERS))
def test_chapter_ends_its_claims_with_check_summary(path):
    sources = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    ends = [s for s in sources if "summary()" in s]
    assert ends, "end the chapter's claims with course_lib.check.summary()"
    assert any("assert report.negatives >= 1" in s for s in ends), (
        "assert on summary()'s report that the chapter refuted at least one wrong variant"
    )
    assert not any("len(CLAIMS)" in s for s in sources), "summary() replaces the CLAIMS-counting cell"
