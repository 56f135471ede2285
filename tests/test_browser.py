"""The widgets where users see them: JupyterLab in a real (headless) Chromium, driven by Playwright.

A JupyterLab server starts on loopback with token auth and the project's kernel; a generated
notebook loads the demo model and shows the sampling panel. The test checks that the sliders render,
sets max_tokens through the slider's readout, runs a ``%%vllm`` cell and checks that the answer is that
short, then types into the playground, clicks Generate and watches the streamed answer grow.
Screenshots go to ``artifacts/browser/``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from browser.lab import CHROMIUM_ARGS, JupyterLab, ensure_chromium, write_notebook

PROJECT = Path(__file__).resolve().parents[1]
SHOTS = PROJECT / "artifacts" / "browser"
NOTEBOOK = "widgets-in-the-browser.ipynb"
SHORT = 5  # max_tokens set through the UI
STREAM_TOKENS = 80  # max_tokens set in the playground's own controls

CELLS = [
    # 0: load the demo model (greedy, so the answers are reproducible); %vllm_load shows the panel
    "%load_ext vllm_magic\n"
    "%config VllmMagics.temperature = 0\n"
    "%vllm_load",
    # 1: a prompt cell with the panel's settings
    "%%vllm\n"
    "Write a long story about a dragon who learns to cook.",
    # 2: the playground
    "%vllm_playground",
]

LOAD_TIMEOUT = 420_000  # ms: a kernel start plus a CPU engine load on a busy 2-core machine
RUN_TIMEOUT = 180_000


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    chromium = ensure_chromium()
    root = tmp_path_factory.mktemp("lab")
    write_notebook(root / NOTEBOOK, CELLS)
    server = JupyterLab(root, PROJECT)
    try:
        server.start()
        server.chromium = chromium
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def page(lab):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=lab.chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(lab.url(NOTEBOOK), wait_until="domcontentloaded")
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(state="visible", timeout=120_000)
            _wait_kernel_idle(page, 180_000)
            yield page
        finally:
            browser.close()


@pytest.fixture(autouse=True)
def _screenshot_on_failure(request, page):
    """A screenshot of the page whenever a test of this module fails."""
    failures = request.session.testsfailed
    yield
    if request.session.testsfailed > failures:
        page.screenshot(path=str(SHOTS / f"failure-{request.node.name}.png"))


# ----- helpers -------------------------------------------------------------------------------------

def _wait_kernel_idle(page, timeout):
    """Wait until the notebook is connected to its kernel and the kernel is idle."""
    # The execution indicator also says "idle" before any kernel exists: read the status bar.
    page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"vllm-magic \(test\) \| Idle")).first.wait_for(
        state="visible", timeout=timeout)


def _cell(page, index):
    return page.locator(".jp-Notebook .jp-Cell").nth(index)


def _run_cell(page, index, timeout):
    """Select a cell, press Shift+Enter as a user would, and wait until it has run."""
    cell = _cell(page, index)
    prompt = cell.locator(".jp-InputArea-prompt")
    deadline = time.monotonic() + timeout / 1000
    for _attempt in range(3):  # a key press can be lost while JupyterLab is still settling
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        started = time.monotonic()
        while time.monotonic() - started < 10 and prompt.inner_text().strip() == "[ ]:":
            time.sleep(0.25)
        if prompt.inner_text().strip() != "[ ]:":
            break
    text = prompt.inner_text().strip()
    while time.monotonic() < deadline:
        text = prompt.inner_text().strip()
        if re.fullmatch(r"\[\d+\]:", text):
            return cell
        time.sleep(0.25)
    raise AssertionError(f"cell {index} did not finish in {timeout / 1000:.0f} s (prompt {text!r}); "
                         f"its output: {cell.locator('.jp-OutputArea').inner_text()[-1500:]}")


def _set_slider(slider, value):
    """Type a value into a slider's readout (ipywidgets 8 readouts are editable) and press Enter."""
    readout = slider.locator(".widget-readout")
    readout.click()
    readout.press("Control+a")
    readout.type(str(value))
    readout.press("Enter")


def _no_errors(cell):
    errors = cell.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    text = "\n".join(errors.all_inner_texts())
    assert "Traceback" not in text and "Error" not in text, f"the cell printed an error:\n{text[-2000:]}"


# ----- the tests -----------------------------------------------------------------------------------

def test_the_panel_renders_its_sliders(page):
    cell = _run_cell(page, 0, LOAD_TIMEOUT)
    _no_errors(cell)
    panel = cell.locator(".vllm-sampling-panel")
    panel.wait_for(state="visible", timeout=60_000)
    sliders = panel.locator(".widget-slider")
    assert sliders.count() == 6, f"expected 6 sliders, found {sliders.count()}"
    for name in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "repetition"):
        slider = panel.locator(".widget-slider", has=page.locator(".widget-label", has_text=name)).first
        assert slider.is_visible(), f"slider {name} is not visible"
        assert slider.locator(".noUi-handle").is_visible(), f"slider {name} has no handle"
    temperature = panel.locator(".vllm-temperature .widget-readout")
    assert temperature.inner_text().strip() == "0.00"  # the kernel's value reached the view
    assert "SmolLM2-135M-Instruct" in panel.locator(".vllm-status").inner_text()
    assert panel.locator(".vllm-stop-all").is_visible() and panel.locator(".vllm-reset").is_visible()
    cell.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "01-panel.png"))
    panel.screenshot(path=str(SHOTS / "01-panel-closeup.png"))


def test_max_tokens_set_in_the_ui_bounds_the_next_answer(page):
    panel = _cell(page, 0).locator(".vllm-sampling-panel")
    _set_slider(panel.locator(".vllm-max-tokens"), SHORT)
    expect(panel.locator(".vllm-max-tokens .widget-readout")).to_have_text(re.compile(rf"^\s*{SHORT}\s*$"))
    time.sleep(0.5)  # the comm message reaches the kernel before the next cell's execute request
    cell = _run_cell(page, 1, RUN_TIMEOUT)
    _no_errors(cell)
    output = cell.locator(".jp-OutputArea").inner_text()
    # The cell's value (VllmResult) and its stats line both say how the answer ended.
    assert f"tokens={SHORT}, finish_reason='length'" in output, f"unexpected output:\n{output[-1500:]}"
    assert f"{SHORT} tokens" in output and "stopped at max tokens" in output, output[-1500:]
    shown = [t.strip() for t in cell.locator(".jp-OutputArea-output").all_inner_texts() if t.strip()]
    answer = shown[0]  # the answer comes first, then the stats line, then the cell's value
    assert 0 < len(answer.split()) <= SHORT, f"the answer is not {SHORT} tokens short: {answer!r}"
    status = panel.locator(".vllm-status")
    page.wait_for_function("el => el.innerText.includes('tok/s')", arg=status.element_handle(), timeout=10_000)
    assert f"{SHORT} tokens" in status.inner_text()
    cell.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "02-short-answer.png"))


def test_playground_generate_streams_text_into_the_page(page):
    cell = _run_cell(page, 2, RUN_TIMEOUT)
    _no_errors(cell)
    playground = cell.locator(".vllm-playground")
    playground.wait_for(state="visible", timeout=60_000)
    # The playground's own controls share the panel's settings: max_tokens is still SHORT there.
    playground.get_by_text("Sampling settings").click()
    slider = playground.locator(".vllm-max-tokens")
    slider.wait_for(state="visible", timeout=10_000)
    assert slider.locator(".widget-readout").inner_text().strip() == str(SHORT)
    _set_slider(slider, STREAM_TOKENS)
    # Through the kernel, the panel of the first cell follows (both views link to one model).
    expect(_cell(page, 0).locator(".vllm-max-tokens .widget-readout")).to_have_text(
        re.compile(rf"^\s*{STREAM_TOKENS}\s*$"), timeout=30_000)

    playground.locator(".vllm-prompt textarea").fill("Tell me a long story about a brave knight and a dragon.")
    playground.locator(".vllm-generate").click()
    answer = playground.locator(".vllm-playground-answer")
    seen: list[int] = []
    deadline = time.monotonic() + RUN_TIMEOUT / 1000
    shot = False
    while time.monotonic() < deadline:
        length = len(answer.inner_text().strip())
        if length and (not seen or length != seen[-1]):
            seen.append(length)
        if len(seen) >= 3 and not shot:
            playground.scroll_into_view_if_needed()
            page.screenshot(path=str(SHOTS / "03-playground-streaming.png"))
            shot = True
        if "tok/s" in playground.locator(".vllm-playground-stats").inner_text():
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the playground did not finish in {RUN_TIMEOUT / 1000:.0f} s; lengths seen: {seen}")
    assert len(seen) >= 3, f"the answer did not stream (text lengths read: {seen})"
    assert seen == sorted(seen), f"the streamed text shrank: {seen}"
    history = playground.locator(".vllm-playground-history")
    assert f"max_tokens={STREAM_TOKENS}" in history.inner_text()
    assert not playground.locator(".vllm-generate").is_disabled()
    playground.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "04-playground-done.png"))
    playground.screenshot(path=str(SHOTS / "04-playground-closeup.png"))
