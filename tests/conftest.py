"""Shared test set-up: no network for models, no windows for plots."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected what they will
def pytest_collection_modifyitems(config, items):
    """nbval does not execute a chapter a second time when the browser test runs it in JupyterLab and nbval would
    compare none of its outputs (no NBVAL_CHECK_OUTPUT cell): both then check the same thing, that every cell
    runs without an error (the browser test also fails on an error output and on cells left unrun). This saves
    chapters 05 and 06 a second execution. Where the browser test will skip itself, nbval runs them as usual."""
    browser_runs = {
        item.callspec.params["notebook"]
        for item in items
        if getattr(item, "originalname", "") == "test_chapter_runs_in_jupyterlab_and_its_widgets_work"
    }
    if not browser_runs:
        return
    from test_browser import browser_missing

    if browser_missing() and os.environ.get("COURSE_REQUIRE_BROWSER") != "1":
        return
    left_to_browser = {
        name
        for name in browser_runs
        if "NBVAL_CHECK_OUTPUT" not in (config.rootpath / "notebooks" / name).read_text(encoding="utf-8")
    }
    kept, deselected = [], []
    for item in items:
        in_notebook = item.path.suffix == ".ipynb" and item.path.name in left_to_browser
        (deselected if in_notebook else kept).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
        config.course_left_to_browser = sorted(left_to_browser)


def pytest_report_collectionfinish(config, start_path, items):
    names = getattr(config, "course_left_to_browser", [])
    if names:
        return f"executed by the browser test only (nbval compares none of their outputs): {', '.join(names)}"
