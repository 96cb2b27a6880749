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
from transformers import AutoModel, AutoTokenizer

from course_lib.assets import minilm_dir
from course_lib.attention import scaled_dot_product_attention
from course_lib.data import cache_path
from course_lib.masks import causal_padding_mask, token_mask_from_lengths
from course_lib.memory import RECIPES, Parallelism, per_device_memory
from course_lib.model import GPT, next_token_probs
from course_lib.tokenizer import CharTokenizer
from course_lib.widgets import encoder_attention, gpt_attention
from course_lib.widgets.memory_calculator import PRESETS

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
RUN_TIMEOUT_MS = 900_000  # chapter 05 runs about three minutes alone, twice that when the CPU is shared


def worked_example_weights(shown: dict[str, float]) -> torch.Tensor:
    """Chapter 01's heat map: the attention weights of the chosen query row of the worked example."""
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    Q = X @ torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    return scaled_dot_product_attention(Q, X, X)[1][int(shown["query row"])]


def chapter02_explorer_mask(shown: dict[str, float]) -> torch.Tensor:
    """Chapter 02's mask explorer: the shown sequence's causal + left-padding mask at length T."""
    length = int(shown["length T"])
    lengths = [max(length - int(shown[f"padding {b}"]), 0) for b in range(3)]
    token_mask = token_mask_from_lengths(lengths, max_len=length, side="left")
    return causal_padding_mask(token_mask)[2, 0].double()


def chapter05_model():
    """The model chapter 05 trained, as it saved it for this test, with its character tokenizer."""
    saved = torch.load(cache_path("chapter05_gpt.pt"), weights_only=False)
    model = GPT(saved["config"]).eval()
    model.load_state_dict(saved["state"])
    return model, CharTokenizer(saved["chars"][:-1], unknown=saved["chars"][-1])


def chapter05_next_token(shown: dict[str, float]) -> torch.Tensor:
    """Chapter 05's sampling explorer: the ten most likely next tokens under the shown settings."""
    model, tokenizer = chapter05_model()
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode(CHAPTER05_SAMPLING_PROMPT)])).logits[0, -1]
    top_k = int(shown["top-k (0 off)"]) or None
    probs = next_token_probs(logits, shown["temperature"], top_k, shown["top-p"])
    return probs.sort(descending=True).values[:10].double()


def chapter05_attention(shown: dict[str, float]) -> torch.Tensor:
    """Chapter 05's attention view: the weights of the shown layer, head and query on the notebook's prompt."""
    model, tokenizer = chapter05_model()
    weights = gpt_attention(model, tokenizer)(CHAPTER05_ATTENTION_PROMPT)[1]
    return weights[int(shown["layer"]), int(shown["head"]), int(shown["query"])].double()


def chapter06_minilm_attention(shown: dict[str, float]) -> torch.Tensor:
    """Chapter 06's MiniLM view: the pretrained encoder's weights for the shown layer, head and query."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModel.from_pretrained(minilm_dir(), attn_implementation="eager")
    weights = encoder_attention(model, tokenizer)(CHAPTER06_PROMPT)[1]
    return weights[int(shown["layer"]), int(shown["head"]), int(shown["query"])].double()


def chapter08_memory(shown: dict[str, float]) -> torch.Tensor:
    """Chapter 08's memory calculator: GiB per device for LLaMA-2 7B as the notebook sets it up (mixed precision,
    Adam, checkpointing), with the sliders as shown."""
    parallel = Parallelism(int(shown["data ∥"]), int(shown["tensor ∥"]), int(shown["pipeline ∥"]),
                           int(shown["ZeRO stage"]))  # fmt: skip
    memory = per_device_memory(PRESETS["LLaMA-2 7B"], int(shown["micro-batch"]), int(shown["sequence"]),
                               RECIPES["mixed"], "adam", True, parallel)  # fmt: skip
    return torch.tensor([round(v / 2**30, 3) for v in (*memory.as_dict().values(), memory.total)],
                        dtype=torch.float64)


CHAPTER05_SAMPLING_PROMPT = "JULIET.\nO Romeo, Romeo! wherefore art thou"
CHAPTER05_ATTENTION_PROMPT = "ROMEO.\nBut soft, what light"
CHAPTER06_PROMPT = "To be, or not to be, that is the question."


@dataclass(frozen=True)
class WidgetCase:
    notebook: str  # the chapter that shows the widget
    widget: str  # CSS class of the widget's root element
    slider: str  # CSS class of the slider the test moves
    key: str  # the key pressed on the slider's handle: one step
    cells: str  # CSS class of the table cells whose numbers are read
    expected: Callable[[dict[str, float]], torch.Tensor]  # what course_lib computes for the sliders shown


WIDGETS = [
    WidgetCase("01_attention_by_hand.ipynb", "course-attention-heatmap", "course-attention-query-slider",
               "ArrowRight", "course-weight", worked_example_weights),
    WidgetCase("02_masking.ipynb", "course-mask-explorer", "course-mask-length",
               "ArrowLeft", "course-mask-cell", chapter02_explorer_mask),
    WidgetCase("05_training_a_small_gpt.ipynb", "course-sampling-explorer", "course-sampling-temperature",
               "ArrowLeft", "course-sampling-prob", chapter05_next_token),
    WidgetCase("05_training_a_small_gpt.ipynb", "course-model-attention", "course-model-layer",
               "ArrowRight", "course-model-weight", chapter05_attention),
    WidgetCase("06_bert_mlm.ipynb", "course-model-attention", "course-model-layer",
               "ArrowRight", "course-model-weight", chapter06_minilm_attention),
    WidgetCase("08_memory_and_compute.ipynb", "course-memory-calculator", "course-memory-zero",
               "ArrowRight", "course-memory-gib", chapter08_memory),
]  # fmt: skip
NOTEBOOKS = sorted({case.notebook for case in WIDGETS})


def browser_missing() -> list[str]:
    """What the browser test lacks on this machine, in words; empty when it can run."""
    from importlib.util import find_spec

    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"Chromium at {CHROMIUM} (run `make browser-deps`, or `apt-get install chromium` as root)")
    if find_spec("playwright") is None:
        missing.append("the playwright package (run `make setup`)")
    return missing


def require_browser() -> None:
    missing = browser_missing()
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
    context = browser.new_context(viewport={"width": 1400, "height": 1600})
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
    return table.squeeze()  # a one-row or one-column table as a vector


def slider_values(widget) -> dict[str, float]:
    """Every slider of a widget as the page shows it: its label -> the number in its readout."""
    pairs = widget.locator(".widget-slider").evaluate_all(
        "sliders => sliders.map(s => [s.querySelector('.widget-label').textContent,"
        " s.querySelector('.widget-readout').textContent])"
    )
    return {label.strip(): float(value) for label, value in pairs}


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


def check_widget(page, case: WidgetCase, tmp_path: Path) -> None:
    """The widget rendered, shows what course_lib computes, and still does after one step of a slider."""
    widget = page.locator(f".{case.widget}").first
    widget.scroll_into_view_if_needed()
    image = widget.locator("img").first
    assert image.evaluate("img => img.complete && img.naturalWidth > 0"), "the widget's picture did not render"
    before = slider_values(widget)
    torch.testing.assert_close(numbers(widget, case.cells), case.expected(before), atol=5e-5, rtol=0)

    label = widget.locator(f".{case.slider} .widget-label").inner_text().strip()
    handle = widget.locator(f".{case.slider} .noUi-handle")
    handle.focus()
    handle.press(case.key)
    deadline = time.monotonic() + 30
    while (after := slider_values(widget))[label] == before[label]:
        assert time.monotonic() < deadline, f"pressing {case.key} did not move the slider '{label}'"
        time.sleep(0.1)
    expected = case.expected(after)
    while True:  # the kernel recomputes and sends the new table back
        try:
            shown = numbers(widget, case.cells)
            if shown.shape == expected.shape and torch.allclose(shown, expected, atol=5e-5, rtol=0):
                break
        except ValueError:  # the table is being replaced
            shown = None
        assert time.monotonic() < deadline, (
            f"after moving '{label}' the page shows {shown}, course_lib computes {expected}"
        )
        time.sleep(0.2)
    name = f"{Path(case.notebook).stem}-{case.widget.removeprefix('course-')}"
    widget.screenshot(path=tmp_path / f"{name}.png")
    if "COURSE_SCREENSHOTS_DIR" in os.environ:
        target = Path(os.environ["COURSE_SCREENSHOTS_DIR"]) / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / f"{name}.png", target)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.removesuffix(".ipynb") for n in NOTEBOOKS])
def test_chapter_runs_in_jupyterlab_and_its_widgets_work(guarded, lab, notebook, tmp_path):
    page = guarded.page
    run_all_cells(page, lab, notebook)
    stderr = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_text_contents()
    errors = [text[:300] for text in stderr if re.search(r"Traceback|Error", text)]
    assert not errors, f"cells show errors: {errors}"
    counts = page.locator(".jp-CodeCell .jp-InputArea-prompt").all_text_contents()
    code = [c for c in json.loads((ROOT / "notebooks" / notebook).read_text())["cells"] if c["cell_type"] == "code"]
    # a hidden solution cell shows no prompt: the visible prompts are the numbers of the visible cells
    expected = [f"[{i}]:" for i, c in enumerate(code, 1) if not c["metadata"].get("jupyter", {}).get("source_hidden")]
    assert counts == expected, f"cells did not all run, in order: {counts}, expected {expected}"
    page.screenshot(path=tmp_path / "page.png")
    for case in WIDGETS:
        if case.notebook == notebook:
            check_widget(page, case, tmp_path)
    assert not guarded.leaving, f"requests tried to leave localhost: {guarded.leaving}"


def test_requests_leaving_localhost_are_blocked_and_recorded(guarded, lab):
    """The guard the chapter test relies on: a page that reaches outside is stopped and reported."""
    guarded.page.set_content("<p>probe</p>")  # a page without the server's content security policy
    outcome = guarded.page.evaluate(
        "() => fetch('http://example.invalid/course-probe').then(() => 'reached', () => 'blocked')"
    )
    assert outcome == "blocked"
    assert guarded.leaving == ["http://example.invalid/course-probe"]
