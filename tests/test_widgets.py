"""The sampling panel and the playground, driven from Python against the real demo-model engine.

Widget values are set the way the front-end sets them (assigning a control's ``value``, calling a
button's ``click()``); what reaches vLLM is read from the ``SamplingParams`` the session builds.
"""

from __future__ import annotations

import html

import ipywidgets as widgets
import pytest

import vllm_magic.engine.backends.local as local_module
from vllm_magic.widgets.playground import _PRE, Playground
from vllm_magic.widgets import SLIDERS, SamplingPanel, decode_stop, encode_stop, parse_seed

_EMPTY_ANSWER = _PRE.format("")
LONG_PROMPT = "Write a very long story about a dragon who learns to cook. Describe every dish in detail."


@pytest.fixture
def built_params(monkeypatch):
    """Every SamplingParams the in-process engine builds, in order."""
    built = []
    real = local_module.build_sampling_params

    def spy(*args, **kwargs):
        params = real(*args, **kwargs)
        built.append(params)
        return params

    monkeypatch.setattr(local_module, "build_sampling_params", spy)
    return built


@pytest.fixture
def panels(engine):
    made = []

    def make(**kwargs):
        panel = SamplingPanel(engine, **kwargs)
        made.append(panel)
        return panel

    yield make
    for panel in made:
        panel.close()


# ----- pure logic ---------------------------------------------------------------------------------

def test_stop_strings_show_escapes_and_drop_empty_tags():
    assert encode_stop(["\n\n", "a\tb", "x\\y"]) == ["\\n\\n", "a\\tb", "x\\\\y"]
    assert decode_stop(["\\n\\n", "a\\tb", "x\\\\y", "END"]) == ["\n\n", "a\tb", "x\\y", "END"]
    assert decode_stop(encode_stop(["\n", "Human:"])) == ["\n", "Human:"]
    assert decode_stop(["\\q"]) == ["\\q"]  # unknown escapes stay as typed
    assert decode_stop(["", "END", ""]) == ["END"]  # vLLM refuses an empty stop string


def test_seed_text_blank_is_random_and_junk_is_refused():
    assert parse_seed("") is None and parse_seed("  ") is None
    assert parse_seed(" 42 ") == 42
    for junk in ("abc", "1.5", "-1", str(2**64)):
        with pytest.raises(ValueError):
            parse_seed(junk)


def test_every_slider_has_explicit_bounds_and_updates_on_release(engine, panels):
    panel = panels()
    for name, (cls, low, high, step, _label, _tip) in SLIDERS.items():
        control = panel.controls[name]
        assert isinstance(control, cls)
        assert control.min == low and control.step == step
        assert control.continuous_update is False
        assert control.max == (engine.status().max_model_len if name == "max_tokens" else high)
    assert panel.controls["seed"].continuous_update is False
    assert panel.controls["system_prompt"].continuous_update is False


# ----- widgets -> SamplingParams -------------------------------------------------------------------

def test_widget_values_change_the_next_requests_sampling_params(engine, panels, built_params):
    panel = panels()
    c = panel.controls
    c["temperature"].value = 0.35
    c["top_p"].value = 0.9
    c["top_k"].value = 20
    c["min_p"].value = 0.05
    c["max_tokens"].value = 7
    c["repetition_penalty"].value = 1.15
    c["seed"].value = "1234"
    c["stop"].value = ["\\n\\n", "THE END"]

    result = engine.generate(LONG_PROMPT)

    params = built_params[-1]
    assert params.temperature == pytest.approx(0.35)
    assert params.top_p == pytest.approx(0.9)
    assert params.top_k == 20
    assert params.min_p == pytest.approx(0.05)
    assert params.max_tokens == 7
    assert params.repetition_penalty == pytest.approx(1.15)
    assert params.seed == 1234
    assert params.stop == ["\n\n", "THE END"]
    assert 0 < result.output_tokens <= 7


def test_max_tokens_slider_bounds_the_answer(engine, panels):
    panel = panels()
    panel.controls["temperature"].value = 0.0
    panel.controls["max_tokens"].value = 4
    short = engine.generate(LONG_PROMPT)
    assert short.output_tokens == 4 and short.finish_reason == "length"
    panel.controls["max_tokens"].value = 24
    longer = engine.generate(LONG_PROMPT)
    assert longer.output_tokens == 24
    assert longer.text.startswith(short.text)  # greedy: the same answer, cut later


def test_blank_seed_means_random(engine, panels, built_params):
    panel = panels()
    panel.controls["seed"].value = "7"
    engine.generate("Hi", max_tokens=1)
    panel.controls["seed"].value = ""
    engine.generate("Hi", max_tokens=1)
    assert [p.seed for p in built_params] == [7, None]


def test_seed_field_refuses_junk_and_keeps_the_seed_in_use(engine, panels):
    panel = panels()
    panel.controls["seed"].value = "99"
    panel.controls["seed"].value = "not a number"
    assert engine.defaults.seed == 99
    assert panel.controls["seed"].value == "99"


def test_mode_and_system_prompt_change_what_is_sent(engine, panels):
    panel = panels()
    panel.controls["system_prompt"].value = "You are a terse pirate."
    chat = engine.render_prompt("Hello")
    assert "You are a terse pirate." in chat and chat != "Hello"
    panel.controls["raw"].value = True
    assert engine.render_prompt("Hello") == "Hello"
    assert panel.controls["system_prompt"].disabled  # a raw prompt has no system turn


@pytest.mark.parametrize("end", ["min", "max"])
def test_no_value_the_panel_can_produce_breaks_a_request(engine, panels, end):
    panel = panels()
    for name, control in panel.controls.items():
        if name in SLIDERS:
            control.value = getattr(control, end)
    panel.controls["seed"].value = "0" if end == "min" else str(2**63 - 1)
    panel.controls["stop"].value = ["\\n", "\\\\", "\\"]
    panel.controls["system_prompt"].value = "" if end == "min" else "x" * 2000
    handle = engine.submit(LONG_PROMPT)[0]
    if end == "max":  # max_tokens = the whole context: read a few tokens, then stop
        assert handle.wait_for_delta(0, timeout=60), "no tokens came"
        handle.abort()
    result = handle.result(timeout=60)
    assert result.error is None
    assert result.output_tokens >= 1


# ----- several panels, Reset, %config-style changes ---------------------------------------------------

def test_two_panels_stay_in_sync(engine, panels):
    first, second = panels(), panels()
    first.controls["temperature"].value = 1.25
    first.controls["stop"].value = ["\\n"]
    first.controls["seed"].value = "5"
    assert second.controls["temperature"].value == 1.25
    assert second.controls["stop"].value == ["\\n"]
    assert second.controls["seed"].value == "5"
    second.controls["max_tokens"].value = 33
    second.controls["raw"].value = True
    assert first.controls["max_tokens"].value == 33 and first.controls["raw"].value is True
    engine.defaults.top_k = 40  # what %config does: write the shared defaults
    assert first.controls["top_k"].value == second.controls["top_k"].value == 40
    second.reset_button.click()
    assert first.controls["temperature"].value == 0.7
    assert first.controls["seed"].value == "" and engine.defaults.seed is None
    assert first.controls["stop"].value == [] and first.controls["top_k"].value == 0


def test_a_closed_panel_lets_go_of_the_session(engine):
    before = len(engine.listeners)
    panel = SamplingPanel(engine)
    assert len(engine.listeners) == before + 1
    panel.close()
    assert len(engine.listeners) == before
    engine.defaults.temperature = 0.1  # must not reach the closed controls
    assert panel.controls["temperature"].value == 0.7


# ----- Stop and the status line --------------------------------------------------------------------

def test_stop_button_aborts_a_long_generation_and_says_so(engine, panels):
    panel = panels()
    handle = engine.submit(LONG_PROMPT, max_tokens=4000, ignore_eos=True)[0]
    assert handle.wait_for_delta(0, timeout=60), "no tokens came"
    panel.stop_button.click()
    result = handle.result(timeout=60)
    assert result.aborted and result.finish_reason == "abort" and 0 < result.output_tokens < 4000
    assert engine.status().requests_live == 0
    assert "stopped 1 request" in panel.status_line.value


def test_status_line_shows_model_and_last_request_speed(engine, panels):
    panel = panels()
    assert "SmolLM2-135M-Instruct" in panel.status_line.value
    result = engine.generate("Name three colors.", max_tokens=12)
    engine.listeners.drain()  # the panel hears of results on the listeners' thread
    assert f"{result.output_tokens} tokens" in panel.status_line.value
    assert "TTFT" in panel.status_line.value


def test_panel_text_repr_lists_the_changed_settings(engine, panels):
    panel = panels()
    assert repr(panel) == "SamplingPanel(SmolLM2-135M-Instruct; default settings)"
    panel.controls["temperature"].value = 0.0
    panel.controls["max_tokens"].value = 64
    assert repr(panel) == "SamplingPanel(SmolLM2-135M-Instruct; temperature=0.0, max_tokens=64)"


# ----- the playground ------------------------------------------------------------------------------

@pytest.fixture
def playground(engine):
    pg = Playground(engine)
    yield pg
    pg.close()


def test_playground_streams_an_answer_and_keeps_it_in_the_history(engine, playground):
    assert isinstance(playground.controls, SamplingPanel)
    playground.controls.controls["temperature"].value = 0.0
    playground.controls.controls["max_tokens"].value = 120
    updates = []
    playground.answer.observe(lambda change: updates.append(change["new"]), "value")
    playground.prompt.value = LONG_PROMPT
    playground.generate_button.click()
    assert playground.generate_button.disabled and not playground.stop_button.disabled
    run = playground.wait(timeout=120)
    assert run.error is None and run.result is not None
    assert run.result.output_tokens > 20
    final = playground.answer.value
    assert html.escape(run.text) in final
    partial = {u for u in updates if u != final and len(u) > len(_EMPTY_ANSWER)}
    assert len(partial) >= 2, f"the answer area showed {len(partial)} partial answers before the end"
    assert run.settings["temperature"] == 0.0 and run.settings["max_tokens"] == 120
    assert "temperature=0.0" in playground.history.value and "max_tokens=120" in playground.history.value
    assert not playground.generate_button.disabled and playground.stop_button.disabled


def test_playground_answer_matches_the_session_greedy_answer(engine, playground):
    engine.defaults.temperature = 0.0
    run = playground.generate("What is the capital of France?")
    playground.wait(timeout=60)
    assert "Paris" in run.text
    assert run.text == engine.generate("What is the capital of France?").text
    assert repr(playground) == "Playground(SmolLM2-135M-Instruct, 1 run)"


def test_playground_stop_aborts_its_request(engine, playground):
    engine.defaults.max_tokens = 4000
    run = playground.generate(LONG_PROMPT)
    assert playground._handle.wait_for_delta(0, timeout=120)  # first text came (the request runs for 4000 tokens)
    playground.stop_button.click()
    playground.wait(timeout=60)
    assert run.result.aborted and 0 < run.result.output_tokens < 4000
    assert engine.status().requests_live == 0
    assert "interrupted" in playground.stats.value and playground.stop_button.disabled


def test_playground_reports_problems_in_the_widget(engine, playground):
    assert playground.generate("   ") is None
    assert "Type a prompt first" in playground.answer.value
    assert playground.generate("word " * 20000) is None  # longer than the context
    assert "PromptTooLongError" in playground.answer.value
    assert playground.last.error.startswith("PromptTooLongError")
    engine.defaults.max_tokens = 3
    run = playground.generate("Hello")  # the engine still serves the next run
    playground.wait(timeout=60)
    assert run.result.output_tokens <= 3


def test_playground_history_keeps_the_last_runs(engine):
    pg = Playground(engine, history_size=2)
    try:
        engine.defaults.max_tokens = 2
        for prompt in ("one", "two", "three"):
            pg.generate(prompt)
            pg.wait(timeout=60)
        assert [run.prompt for run in pg.runs] == ["two", "three"]
        assert pg.history.value.count("<tr>") == 3  # header + two runs
    finally:
        pg.close()


def _shown(widget: widgets.Widget) -> list[widgets.Widget]:
    """The widget and every widget a front-end renders inside it (children, accordion panes)."""
    found, stack = [], [widget]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(getattr(current, "children", ()))
    return found


def test_widgets_render_as_live_ipywidgets_views_that_show_their_parts(engine, panels, playground):
    panel = panels()
    for widget, parts in ((panel, [*panel.controls.values(), panel.reset_button, panel.stop_button]),
                          (playground, [playground.prompt, playground.generate_button, playground.stop_button,
                                        playground.answer, *playground.controls.controls.values()])):
        view = widget._repr_mimebundle_()["application/vnd.jupyter.widget-view+json"]
        assert view["model_id"] == widget.model_id and widget.comm is not None  # a live model a front-end shows
        shown = _shown(widget)
        assert [part for part in parts if not any(part is s for s in shown)] == [], "a part is never rendered"


# ----- what the magics and the LangChain objects see ------------------------------------------------

@pytest.fixture(scope="module")
def shell(engine):
    """An IPython shell with the magics loaded (panels are shown only where a test asks)."""
    from IPython.core.interactiveshell import InteractiveShell

    from ipython_capture import make_shell
    from vllm_magic.magics import unregister

    ip, publisher = make_shell()
    ip.run_line_magic("load_ext", "vllm_magic")
    yield ip, publisher
    unregister(ip, shutdown=False)  # the engine is shared with the other test modules
    InteractiveShell.clear_instance()


@pytest.fixture
def ip(shell):
    ip, publisher = shell
    publisher.clear()
    return ip


def _magics(ip):
    from vllm_magic.magics import VllmMagics

    return next(c for c in ip.configurables if isinstance(c, VllmMagics))


def test_panel_values_reach_the_next_vllm_cell(engine, panels, ip):
    panel = panels()
    c = panel.controls
    c["temperature"].value = 0.5  # not 0: greedy sampling makes vLLM drop top_k and top_p
    c["top_k"].value = 12
    c["max_tokens"].value = 6
    c["repetition_penalty"].value = 1.2
    c["seed"].value = "77"
    c["stop"].value = ["THE END"]
    result = ip.run_cell_magic("vllm", "--quiet", LONG_PROMPT)
    params = result.sampling_params
    assert params.temperature == 0.5 and params.top_k == 12 and params.max_tokens == 6
    assert params.repetition_penalty == pytest.approx(1.2) and params.seed == 77 and params.stop == ["THE END"]
    assert 0 < result.generation.output_tokens <= 6
    flagged = ip.run_cell_magic("vllm", "--quiet -m 3", LONG_PROMPT)  # a flag of the cell wins for that cell
    assert flagged.sampling_params.max_tokens == 3 and flagged.sampling_params.top_k == 12


def test_raw_mode_and_system_prompt_reach_the_vllm_cell(engine, panels, ip):
    panel = panels()
    panel.controls["max_tokens"].value = 2
    panel.controls["system_prompt"].value = "You answer in French."
    chat = ip.run_cell_magic("vllm", "--quiet", "Hello")
    assert "You answer in French." in chat.prompt
    panel.controls["raw"].value = True
    raw = ip.run_cell_magic("vllm", "--quiet", "Hello")
    assert raw.prompt == "Hello"


def test_config_and_panel_stay_in_sync(engine, panels, ip):
    panel = panels()
    ip.run_line_magic("config", "VllmMagics.temperature = 0.25")
    ip.run_line_magic("config", "VllmMagics.stop = ['\\n\\n']")
    assert panel.controls["temperature"].value == 0.25
    assert panel.controls["stop"].value == ["\\n\\n"]
    panel.controls["max_tokens"].value = 99
    assert _magics(ip).max_tokens == 99
    panel.reset_button.click()
    assert _magics(ip).temperature == 0.7 and _magics(ip).stop == []


def test_magics_show_the_panel_and_the_playground(engine, ip, monkeypatch):
    import vllm_magic.magics.commands as magics_module

    shown = []
    real = magics_module.display_widget

    def record(widget):
        shown.append(widget)
        real(widget)

    monkeypatch.setattr(magics_module, "display_widget", record)
    magics = _magics(ip)
    magics.show_controls = True
    try:
        ip.run_line_magic("vllm_load", "")  # already loaded: returns at once, then shows the panel
        ip.run_line_magic("vllm_load", "--no-controls")
        ip.run_line_magic("vllm_controls", "")
        ip.run_line_magic("vllm_playground", "")
    finally:
        magics.show_controls = False
        for widget in shown:
            widget.close()
    assert [type(w) for w in shown] == [SamplingPanel, SamplingPanel, Playground]
    views = [d for d in ip.display_pub.outputs() if "application/vnd.jupyter.widget-view+json" in d]
    assert [d["text/plain"].split("(")[0] for d in views] == ["SamplingPanel", "SamplingPanel", "Playground"]


def test_panel_values_reach_llm_invoke(engine, panels, built_params):
    from vllm_magic.langchain import VLLM

    panel = panels()
    panel.controls["temperature"].value = 0.6
    panel.controls["top_p"].value = 0.8
    panel.controls["max_tokens"].value = 5
    panel.controls["seed"].value = "3"
    llm = VLLM.from_session(engine)
    text = llm.invoke(LONG_PROMPT)
    params = built_params[-1]
    assert params.temperature == pytest.approx(0.6) and params.top_p == pytest.approx(0.8)
    assert params.max_tokens == 5 and params.seed == 3
    assert text
    usage = llm.generate([LONG_PROMPT]).llm_output["token_usage"]
    assert 0 < usage["completion_tokens"] <= 5
    panel.controls["max_tokens"].value = 9  # the object follows the panel: its field is unset
    llm.invoke(LONG_PROMPT)
    assert built_params[-1].max_tokens == 9
    pinned = VLLM.from_session(engine, max_new_tokens=4)  # a field set on the object wins
    pinned.invoke(LONG_PROMPT)
    assert built_params[-1].max_tokens == 4 and built_params[-1].top_p == pytest.approx(0.8)


def test_panel_values_reach_the_chat_model(engine, panels, built_params):
    from vllm_magic.langchain import ChatVLLM

    panel = panels()
    panel.controls["temperature"].value = 0.0
    panel.controls["max_tokens"].value = 3
    message = ChatVLLM.from_session(engine).invoke("Tell me a long story.")
    assert built_params[-1].max_tokens == 3 and built_params[-1].temperature == 0.0
    assert 0 < message.usage_metadata["output_tokens"] <= 3


def test_stop_ends_a_running_vllm_cell_with_what_was_streamed(engine, panels, ip):
    import threading

    panel = panels()
    panel.controls["max_tokens"].value = 4000
    clicked, streaming = {}, threading.Event()

    def click_when_streaming():
        # The cell's own progress triggers the click: its second display update of the answer.
        clicked["streaming"] = streaming.wait(120) and engine.status().requests_live > 0
        panel.stop_button.click()

    def streamed():
        return [c["data"]["text/plain"] for c in ip.display_pub.calls
                if c["update"] and c["data"].get("text/plain", "").endswith(" ▌")]

    ip.display_pub.on_update = lambda count: len(streamed()) >= 2 and streaming.set()
    thread = threading.Thread(target=click_when_streaming)
    thread.start()
    try:
        result = ip.run_cell_magic("vllm", "--quiet", LONG_PROMPT)
    finally:
        ip.display_pub.on_update = None
        thread.join(timeout=180)
    assert not thread.is_alive()
    assert clicked["streaming"], "Stop was clicked before the cell streamed"
    assert result.interrupted and result.generation.aborted and 0 < result.generation.output_tokens < 4000
    assert result.text.startswith(streamed()[-1].removesuffix(" ▌"))  # the cell keeps what it streamed
    assert engine.status().requests_live == 0
