"""The course as a learner meets it: JupyterLab in headless Chromium, every cell run, every widget driven.

For each chapter in WIDGETS: open it in JupyterLab, run all cells, check that no cell shows an error and that
the widget rendered, read its numbers from the page, move one of its sliders with the keyboard, and check the
page now shows what course_lib computes for the new value. Every request that would leave localhost is
blocked and fails the test. Adding a chapter's widget is one line in WIDGETS (and, for a new kind of widget,
the function that computes what it should show).

Needs Debian's chromium (`make browser-deps`); where it is missing the test is skipped with a message,
unless COURSE_REQUIRE_BROWSER=1 (as in CI), which turns the skip into a failure. Screenshots go to the
pytest temporary directory; with COURSE_SCREENSHOTS_DIR set, the widget pictures are also copied there
(`make screenshots` refreshes the ones the README shows).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from course_lib.attention import scaled_dot_product_attention
from course_lib.masks import causal_padding_mask, token_mask_from_lengths

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
RUN_TIMEOUT_MS = 180_000


def worked_example_weights(query: int) -> torch.Tensor:
    """Chapter 01's heat map: the attention weights of one query row of the worked example."""
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    Q = X @ torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    return scaled_dot_product_attention(Q, X, X)[1][query]


def chapter02_explorer_mask(length: int) -> torch.Tensor:
    """Chapter 02's mask explorer: sequence 2 (padding 6, on the left, causal) at sequence length T."""
    lengths = [max(length - padding, 0) for padding in (0, 3, 6)]
    token_mask = token_mask_from_lengths(lengths, max_len=length, side="left")
    return causal_padding_mask(token_mask)[2, 0].double()


@dataclass(frozen=True)
class WidgetCase:
    notebook: str  # the chapter that shows the widget
    widget: str  # CSS class of the widget's root element
    slider: str  # CSS class of the slider the test moves
    key: str  # the key pressed on the slider's handle: one step
    cells: str  # CSS class of the table cells whose numbers are read
    expected: Callable[[int], torch.Tensor]  # what course_lib computes for a slider value


WIDGETS = [
    WidgetCase("01_attention_by_hand.ipynb", "course-attention-heatmap", "course-attention-query-slider",
               "ArrowRight", "course-weight", worked_example_weights),
    WidgetCase("02_masking.ipynb", "course-mask-explorer", "course-mask-length",
               "ArrowLeft", "course-mask-cell", chapter02_explorer_mask),
]  # fmt: skip


def require_browser() -> None:
    from importlib.util import find_spec

    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"Chromium at {CHROMIUM} (run `make browser-deps`, or `apt-get install chromium` as root)")
    if find_spec("playwright") is None:
        missing.append("the playwright package (run `make setup`)")
    if not missing:
        return
    message = "browser test needs " + " and ".join(missing)
    if os.environ.get("COURSE_REQUIRE_BROWSER") == "1":
        pytest.fail(message + "; COURSE_REQUIRE_BROWSER=1 forbids skipping it")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Lab:
    url: str
    token: str
    root: Path


def write_settings(settings: Path) -> None:
    """User settings for the test's JupyterLab: no news or update toasts over the page, and every cell kept
    in the page (no windowing) so the test sees all of them."""
    for plugin, values in {
        "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        "notebook-extension/tracker": {"windowingMode": "none"},
    }.items():
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Lab:
    """JupyterLab from this environment on a free localhost port, over a copy of the notebooks (running them
    in the browser saves them), with its own config, data, runtime, settings and workspace folders."""
    require_browser()
    home = tmp_path_factory.mktemp("jupyterlab")
    shutil.copytree(ROOT / "notebooks", home / "notebooks")
    folders = {name: home / name for name in ("config", "data", "runtime", "settings", "workspaces")}
    for folder in folders.values():
        folder.mkdir()
    write_settings(folders["settings"])
    env = os.environ | {
        "JUPYTER_CONFIG_DIR": str(folders["config"]),
        "JUPYTER_DATA_DIR": str(folders["data"]),
        "JUPYTER_RUNTIME_DIR": str(folders["runtime"]),
        "JUPYTERLAB_SETTINGS_DIR": str(folders["settings"]),
        "JUPYTERLAB_WORKSPACES_DIR": str(folders["workspaces"]),
        "HF_HUB_OFFLINE": "1",
    }
    port, token = free_port(), secrets.token_hex(16)
    command = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
        "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={home / 'notebooks'}",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with open(home / "jupyterlab.log", "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{(home / 'jupyterlab.log').read_text()[-3000:]}")
                time.sleep(0.3)
        yield Lab(url, token, home / "notebooks")
    finally:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{url}/api/shutdown?token={token}", method="POST"))
            server.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def is_local(url: str, lab: Lab) -> bool:
    return url.startswith((lab.url + "/", "data:", "blob:")) or url == lab.url


@dataclass
class GuardedPage:
    page: object  # a playwright Page
    leaving: list[str]  # every request that tried to leave localhost (each one blocked)


@pytest.fixture
def guarded(browser, lab) -> GuardedPage:
    """A fresh page whose every request that would leave localhost is blocked and recorded."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    leaving: list[str] = []

    def route(request_route):
        if is_local(request_route.request.url, lab):
            request_route.continue_()
        else:
            leaving.append(request_route.request.url)
            request_route.abort()

    context.route("**/*", route)
    page = context.new_page()
    ws_url = lab.url.replace("http://", "ws://")
    page.on("websocket", lambda ws: None if ws.url.startswith(ws_url + "/") else leaving.append(ws.url))
    yield GuardedPage(page, leaving)
    context.close()


def numbers(widget, css_class: str) -> torch.Tensor:
    """The numbers in a widget's table, read from the page by their data-row/data-col positions."""
    cells = widget.locator(f"td.{css_class}").evaluate_all(
        "cells => cells.map(c => [Number(c.dataset.row), Number(c.dataset.col), c.textContent])"
    )
    rows = 1 + max(r for r, _, _ in cells)
    cols = 1 + max(c for _, c, _ in cells)
    table = torch.zeros(rows, cols, dtype=torch.float64)
    for r, c, text in cells:
        table[r, c] = float(text)
    return table.squeeze(0)


def slider_value(page, css_class: str) -> int:
    return int(page.locator(f".{css_class} .widget-readout").inner_text())


def run_all_cells(page, lab: Lab, notebook: str) -> None:
    workspace = Path(notebook).stem  # a workspace of its own, reset: only this notebook is open
    page.goto(f"{lab.url}/lab/workspaces/{workspace}/tree/{notebook}?reset&token={lab.token}")
    page.get_by_text("| Idle").wait_for(timeout=RUN_TIMEOUT_MS)  # a kernel exists and is ready
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.wait_for_function(
        """() => {
            const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
            return prompts.length > 0 && prompts.every(p => /^\\[\\d+\\]:$/.test(p.textContent.trim()));
        }""",
        timeout=RUN_TIMEOUT_MS,
    )


@pytest.mark.parametrize("case", WIDGETS, ids=[case.notebook.removesuffix(".ipynb") for case in WIDGETS])
def test_chapter_runs_in_jupyterlab_and_its_widget_works(guarded, lab, case, tmp_path):
    page = guarded.page
    run_all_cells(page, lab, case.notebook)
    stderr = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_text_contents()
    errors = [text[:300] for text in stderr if re.search(r"Traceback|Error", text)]
    assert not errors, f"cells show errors: {errors}"
    counts = page.locator(".jp-CodeCell .jp-InputArea-prompt").all_text_contents()
    assert counts == [f"[{i}]:" for i in range(1, len(counts) + 1)], "cells did not all run, in order"

    widget = page.locator(f".{case.widget}").first
    widget.scroll_into_view_if_needed()
    image = widget.locator("img").first
    assert image.evaluate("img => img.complete && img.naturalWidth > 0"), "the widget's picture did not render"
    page.screenshot(path=tmp_path / "page.png")
    before = slider_value(page, case.slider)
    torch.testing.assert_close(numbers(widget, case.cells), case.expected(before), atol=5e-5, rtol=0)

    handle = widget.locator(f".{case.slider} .noUi-handle")
    handle.focus()
    handle.press(case.key)
    page.wait_for_function(
        "([css, old]) => document.querySelector(`.${css} .widget-readout`).textContent.trim() !== String(old)",
        arg=[case.slider, before],
    )
    after = slider_value(page, case.slider)
    assert after != before
    expected = case.expected(after)
    page.wait_for_function(  # the kernel recomputes and sends the new table back
        "([css, n]) => document.querySelectorAll(`td.${css}`).length === n", arg=[case.cells, expected.numel()]
    )
    deadline = time.monotonic() + 30
    while not torch.allclose(shown := numbers(widget, case.cells), expected, atol=5e-5, rtol=0):
        assert time.monotonic() < deadline, f"the page shows {shown.tolist()}, course_lib computes {expected.tolist()}"
        time.sleep(0.2)
    widget.screenshot(path=tmp_path / "widget.png")
    if "COURSE_SCREENSHOTS_DIR" in os.environ:
        target = Path(os.environ["COURSE_SCREENSHOTS_DIR"]) / f"{Path(case.notebook).stem}-widget.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "widget.png", target)
    assert not guarded.leaving, f"requests tried to leave localhost: {guarded.leaving}"


def test_requests_leaving_localhost_are_blocked_and_recorded(guarded, lab):
    """The guard the chapter test relies on: a page that reaches outside is stopped and reported."""
    guarded.page.set_content("<p>probe</p>")  # a page without the server's content security policy
    outcome = guarded.page.evaluate(
        "() => fetch('http://example.invalid/course-probe').then(() => 'reached', () => 'blocked')"
    )
    assert outcome == "blocked"
    assert guarded.leaving == ["http://example.invalid/course-probe"]
