"""The widgets and the interrupt button where users see them: JupyterLab in a real (headless)
Chromium, driven by Playwright.

A JupyterLab server starts on loopback with token auth and the project's kernel; a generated
notebook loads the demo model and shows the sampling panel. The tests check that the sliders render,
set max_tokens through the slider's readout and run a ``%%vllm`` cell whose answer is that short,
watch a playground answer grow in the page while it streams, stop a playground run with the panel's
Stop button, press JupyterLab's own interrupt button (■) during a ``%%vllm`` cell, and branch from a
token in the token explorer. Screenshots go
to ``artifacts/browser/``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # a machine without Playwright: conftest skips the browser tests there, saying why
    expect = None

from browser.lab import CHROMIUM_ARGS, JupyterLab, ensure_chromium, write_notebook

# Over the suite's 15 min default: a Chromium and JupyterLab start, then a kernel that loads the engine
# (LOAD_TIMEOUT alone is 7 min).
pytestmark = [pytest.mark.timeout(1800), pytest.mark.browser]

PROJECT = Path(__file__).resolve().parents[1]
SHOTS = PROJECT / "artifacts" / "browser"
NOTEBOOK = "widgets-in-the-browser.ipynb"
SHORT = 5  # max_tokens set through the UI
STREAM_TOKENS = 80  # max_tokens set in the playground's own controls
EXPLORED_TOKENS = 48  # max_tokens of the explored answer: its branches grow for a few seconds

CELLS = [
    # 0: load the demo model (greedy, so the answers are reproducible); %vllm_load shows the panel
    "%load_ext vllm_magic\n"
    "%config VllmMagics.temperature = 0\n"
    "%vllm_load",
    # 1: a second panel: its widgets follow the first one's only through the kernel's links
    "%vllm_controls",
    # 2: a prompt cell with the panel's settings
    "%%vllm\n"
    "Write a long story about a dragon who learns to cook.",
    # 3: the playground
    "%vllm_playground",
    # 4: a long answer, for the interrupt button
    "%%vllm -m 1500 -t 0.8\n"
    "Write a very long story about a knight who learns to sing.",
    # 5: the next cell after an interrupt
    "%%vllm -t 0 -m 16\n"
    "What is the capital of France?",
    # 6: the token explorer of a greedy answer
    f"%%vllm -t 0 -m {EXPLORED_TOKENS} --explore --quiet\n"
    "Tell me about the city of Paris.",
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


@pytest.fixture(scope="module")
def loaded(page):
    """The page with the demo model loaded by the notebook's first cell (its panel shown)."""
    cell = _run_cell(page, 0, LOAD_TIMEOUT)
    _no_errors(cell)
    return page


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


def _start_cell(page, index):
    """Select a cell and press Shift+Enter as a user would; returns once the cell is queued or running."""
    cell = _cell(page, index)
    prompt = cell.locator(".jp-InputArea-prompt")
    before = prompt.inner_text().strip()  # "[ ]:" never run, "[3]:" run before
    for attempt in range(3):  # a key press can be lost while JupyterLab is still settling
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        try:
            expect(prompt).not_to_have_text(re.compile(rf"^\s*{re.escape(before)}\s*$"), timeout=10_000)
            return cell
        except AssertionError:
            if attempt == 2:
                raise
    return cell


def _wait_cell_done(page, index, timeout):
    cell = _cell(page, index)
    try:
        expect(cell.locator(".jp-InputArea-prompt")).to_have_text(re.compile(r"^\s*\[\d+\]:\s*$"), timeout=timeout)
    except AssertionError:
        raise AssertionError(f"cell {index} did not finish in {timeout / 1000:.0f} s; its output: "
                             f"{cell.locator('.jp-OutputArea').inner_text()[-1500:]}") from None
    return cell


def _run_cell(page, index, timeout):
    """Run a cell as a user would and wait until it has finished."""
    _start_cell(page, index)
    return _wait_cell_done(page, index, timeout)


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

def test_the_panel_renders_its_sliders(loaded):
    page = loaded
    cell = _cell(page, 0)
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


def test_max_tokens_set_in_the_ui_bounds_the_next_answer(loaded):
    page = loaded
    panel = _cell(page, 0).locator(".vllm-sampling-panel")
    second = _run_cell(page, 1, RUN_TIMEOUT).locator(".vllm-sampling-panel")
    _set_slider(panel.locator(".vllm-max-tokens"), SHORT)
    # The second panel's slider is another widget, linked to the first only in the kernel: once it
    # shows the value, the kernel has taken it, before the next cell's execute request.
    expect(second.locator(".vllm-max-tokens .widget-readout")).to_have_text(re.compile(rf"^\s*{SHORT}\s*$"),
                                                                          timeout=30_000)
    cell = _run_cell(page, 2, RUN_TIMEOUT)
    _no_errors(cell)
    output = cell.locator(".jp-OutputArea").inner_text()
    # The cell's value (VllmResult) and its stats line both say how the answer ended.
    assert f"tokens={SHORT}, finish_reason='length'" in output, f"unexpected output:\n{output[-1500:]}"
    assert f"{SHORT} tokens" in output and "stopped at max tokens" in output, output[-1500:]
    shown = [t.strip() for t in cell.locator(".jp-OutputArea-output").all_inner_texts() if t.strip()]
    answer = shown[0]  # the answer comes first, then the stats line, then the cell's value
    assert 0 < len(answer.split()) <= SHORT, f"the answer is not {SHORT} tokens short: {answer!r}"
    expect(panel.locator(".vllm-status")).to_contain_text(f"{SHORT} tokens", timeout=30_000)
    cell.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "02-short-answer.png"))


# Records, in the page, every change of the playground's answer while the stats line says it is
# still generating: what a user sees, independent of how often the test looks.
_RECORD_STREAM = """([answer, stats]) => {
    window.__answerLengths = [];
    new MutationObserver(() => {
        if (stats.innerText.includes('generating')) window.__answerLengths.push(answer.innerText.trim().length);
    }).observe(answer, {subtree: true, childList: true, characterData: true});
}"""


def _playground(page):
    """Run the playground cell (a fresh playground each time) and open its sampling settings."""
    cell = _run_cell(page, 3, RUN_TIMEOUT)
    _no_errors(cell)
    playground = cell.locator(".vllm-playground")
    playground.wait_for(state="visible", timeout=60_000)
    playground.get_by_text("Sampling settings").click()
    playground.locator(".vllm-max-tokens").wait_for(state="visible", timeout=10_000)
    return playground


def test_playground_generate_streams_text_into_the_page(loaded):
    page = loaded
    playground = _playground(page)
    # The playground's own controls show the panel's settings.
    slider = playground.locator(".vllm-max-tokens")
    panel_value = _cell(page, 0).locator(".vllm-max-tokens .widget-readout").inner_text().strip()
    assert slider.locator(".widget-readout").inner_text().strip() == panel_value
    _set_slider(slider, STREAM_TOKENS)
    # Through the kernel, the panel of the first cell follows (both views link to one model).
    expect(_cell(page, 0).locator(".vllm-max-tokens .widget-readout")).to_have_text(
        re.compile(rf"^\s*{STREAM_TOKENS}\s*$"), timeout=30_000)

    playground.locator(".vllm-prompt textarea").fill("Tell me a long story about a brave knight and a dragon.")
    answer = playground.locator(".vllm-playground-answer")
    stats = playground.locator(".vllm-playground-stats")
    page.evaluate(_RECORD_STREAM, [answer.element_handle(), stats.element_handle()])
    playground.locator(".vllm-generate").click()
    expect(stats).to_contain_text("tok/s", timeout=RUN_TIMEOUT)
    seen = [n for n in page.evaluate("window.__answerLengths") if n]
    assert len(set(seen)) >= 3, f"the answer did not grow in the page while generating (lengths: {seen})"
    assert seen == sorted(seen), f"the streamed text shrank: {seen}"
    assert len(answer.inner_text().strip()) >= seen[-1]
    history = playground.locator(".vllm-playground-history")
    assert f"max_tokens={STREAM_TOKENS}" in history.inner_text()
    assert not playground.locator(".vllm-generate").is_disabled()
    playground.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "04-playground-done.png"))
    playground.screenshot(path=str(SHOTS / "04-playground-closeup.png"))


def test_stop_button_aborts_the_playground_run(loaded):
    page = loaded
    playground = _playground(page)
    _set_slider(playground.locator(".vllm-max-tokens"), 4000)
    expect(playground.locator(".vllm-max-tokens .widget-readout")).to_have_text(re.compile(r"^\s*4000\s*$"))
    playground.locator(".vllm-prompt textarea").fill("Write a very long story about a dragon who learns to cook.")
    playground.locator(".vllm-generate").click()
    answer = playground.locator(".vllm-playground-answer")
    stats = playground.locator(".vllm-playground-stats")
    expect(stats).to_contain_text("generating", timeout=RUN_TIMEOUT)
    expect(answer).not_to_have_text(re.compile(r"^\s*$"), timeout=RUN_TIMEOUT)
    playground.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "03-playground-streaming.png"))
    panel = _cell(page, 0).locator(".vllm-sampling-panel")
    panel.locator(".vllm-stop-all button, button.vllm-stop-all").first.click()
    expect(stats).to_contain_text("interrupted", timeout=60_000)
    expect(panel.locator(".vllm-status")).to_contain_text("stopped 1 request")
    tokens = int(re.search(r"(\d+) tokens", stats.inner_text()).group(1))
    assert 0 < tokens < 4000
    assert not playground.locator(".vllm-generate").is_disabled()
    playground.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "05-stopped.png"))


def _answer_streaming(page, cell):
    """Wait until the cell shows a streaming answer (the ▌ cursor) with a few words."""
    page.wait_for_function(
        """cell => { const out = cell.querySelector('.jp-OutputArea');
                     const text = out ? out.innerText : '';
                     return text.includes('▌') && text.trim().split(/\\s+/).length > 5; }""",
        arg=cell.element_handle(), timeout=RUN_TIMEOUT)


def test_interrupt_button_stops_the_answer_keeps_it_and_the_next_cell_works(loaded):
    page = loaded
    cell = _start_cell(page, 4)
    _answer_streaming(page, cell)
    page.locator("[data-command='notebook:interrupt-kernel']").first.click()
    _wait_cell_done(page, 4, RUN_TIMEOUT)
    outputs = [t.strip() for t in cell.locator(".jp-OutputArea-output").all_inner_texts() if t.strip()]
    text = "\n".join(outputs)
    assert "⏹ interrupted" in text, text[-1500:]
    assert "UsageError: interrupted: the request was aborted in the engine" in text, text[-1500:]
    assert "died" not in text, text[-1500:]
    partial = outputs[0]
    assert len(partial.split()) > 5 and "▌" not in partial, f"the partial answer is not shown: {outputs}"
    cell.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "06-interrupted.png"))
    following = _run_cell(page, 5, RUN_TIMEOUT)
    _no_errors(following)
    assert "Paris" in following.locator(".jp-OutputArea").inner_text()


# Records, in the page, how many tokens the explorer shows while its stats line says it is generating.
_RECORD_BRANCH = """([tokens, stats]) => {
    window.__branchTokens = [];
    new MutationObserver(() => {
        if (stats.innerText.includes('generating')) window.__branchTokens.push(tokens.children.length);
    }).observe(tokens, {childList: true});
}"""


def test_explorer_click_a_token_pick_an_alternative_and_the_branch_grows_in_the_page(loaded):
    page = loaded
    cell = _run_cell(page, 6, RUN_TIMEOUT)
    _no_errors(cell)
    explorer = cell.locator(".vllm-token-explorer")
    explorer.wait_for(state="visible", timeout=60_000)
    tokens = explorer.locator(".vllm-explorer-tokens")
    buttons = tokens.locator(".vllm-explorer-token")
    answer = buttons.all_inner_texts()
    assert len(answer) > 10, f"the explorer shows too few tokens: {answer}"
    # Click the second token: its alternatives appear, the token itself among them (not clickable).
    buttons.nth(1).click()
    alternatives = explorer.locator(".vllm-explorer-alternative")
    expect(alternatives.first).to_be_visible(timeout=30_000)
    assert alternatives.count() == 5, alternatives.all_inner_texts()
    expect(explorer.locator(".vllm-explorer-detail")).to_contain_text("token 2")
    explorer.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "07-explorer-alternatives.png"))
    choice = explorer.locator(".vllm-explorer-alternative:not([disabled])").first
    chosen = choice.inner_text().rsplit(" ", 1)[0].strip()  # "Paris 4.2%" -> "Paris"
    stats = explorer.locator(".vllm-explorer-stats")
    page.evaluate(_RECORD_BRANCH, [tokens.element_handle(), stats.element_handle()])
    choice.click()
    expect(stats).to_contain_text("from the prefix cache", timeout=RUN_TIMEOUT)
    seen = page.evaluate("window.__branchTokens")
    assert len(set(seen)) >= 3 and seen == sorted(seen), f"the branch did not grow in the page: {seen}"
    branch = buttons.all_inner_texts()
    assert branch[0] == answer[0] and branch[1].strip() == chosen and branch[1] != answer[1], (answer, branch)
    assert len(branch) > 2
    expect(explorer.locator(".vllm-explorer-paths select")).to_contain_text("1: at token 2")
    explorer.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "08-explorer-branch.png"))
    explorer.screenshot(path=str(SHOTS / "08-explorer-branch-closeup.png"))
    # Walk back to the answer: its tokens are shown again.
    explorer.locator(".vllm-explorer-parent").click()
    expect(buttons.nth(1)).to_have_text(answer[1].strip() or answer[1], timeout=30_000)
