"""The magics in an IPython shell against the real demo-model engine.

Each test checks both what reached the engine (the ``SamplingParams`` given to ``session.submit``)
and what came back. Every error case ends with a greedy ``%%vllm`` that still answers.
"""

from __future__ import annotations

import _thread
import json
import threading

import pytest
from IPython.core.error import UsageError

from ipython_capture import make_shell
from vllm_magic.magics import VllmMagics
from vllm_magic.magics.results import VllmResult
from vllm_magic.engine.session import EngineSession

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def shell(engine):
    ip, publisher = make_shell()
    ip.run_line_magic("load_ext", "vllm_magic")
    yield ip, publisher
    # The engine is shared with other test modules: drop the magics without shutting it down.
    from vllm_magic.magics import unregister

    unregister(ip, shutdown=False)
    type(ip).clear_instance()


@pytest.fixture
def ip(shell):
    ip, publisher = shell
    publisher.clear()
    yield ip


@pytest.fixture
def pub(shell):
    return shell[1]


@pytest.fixture
def magics(ip) -> VllmMagics:
    return next(c for c in ip.configurables if isinstance(c, VllmMagics))


@pytest.fixture
def submitted(engine, monkeypatch):
    """Every ``session.submit`` call made during the test, with the SamplingParams the engine got."""
    calls = []
    real = engine.submit

    def spy(prompts, sampling=None, **kwargs):
        call = {"prompts": prompts, **kwargs}
        calls.append(call)
        handles = real(prompts, sampling, **kwargs)
        call["sampling"] = handles[0].sampling_params
        return handles

    monkeypatch.setattr(engine, "submit", spy)
    return calls


def vllm(ip, line, cell):
    return ip.run_cell_magic("vllm", line, cell)


def assert_still_answers(ip):
    result = vllm(ip, "-t 0 -m 24 --quiet", QUESTION)
    assert "Paris" in result.text


# ----- loading --------------------------------------------------------------------------------------

def test_reload_of_the_same_model_says_already_loaded(ip, engine, capsys):
    created = engine.engines_created
    ip.run_line_magic("vllm_load", "")
    assert "already loaded" in capsys.readouterr().out
    assert engine.engines_created == created


@pytest.mark.parametrize("line, message", [
    ("/no/such/model", "no such model directory"),
    ("--no-such-engine-flag 3", "unrecognized engine arguments.*vllm serve --help"),
    ("--max-model-len lots", "max-model-len|max_model_len|invalid"),
])
def test_load_errors_are_one_line_usage_errors_and_keep_the_engine(ip, engine, line, message):
    created, config = engine.engines_created, engine.config
    with pytest.raises(UsageError, match=message) as info:
        ip.run_line_magic("vllm_load", line)
    assert type(info.value) is UsageError and len(str(info.value).strip().splitlines()) == 1
    assert engine.loaded and engine.engines_created == created and engine.config is config
    assert_still_answers(ip)


def test_langchain_object_is_published_under_the_as_name(ip, magics, engine):
    from vllm_magic.langchain import VLLM  # part of the package: langchain-core is a dependency

    ip.run_line_magic("vllm_load", "--as chat")
    assert magics.langchain_name == "chat"
    chat = ip.user_ns.pop("chat")
    assert isinstance(chat, VLLM) and chat.session is engine
    engine.defaults.temperature, engine.defaults.max_tokens = 0, 16  # it follows the session's defaults
    assert "Paris" in chat.invoke("What is the capital of France?")


# ----- one cell, one prompt ------------------------------------------------------------------------

def test_greedy_answer_streams_then_renders_markdown_and_stats(ip, pub, submitted):
    result = vllm(ip, "-t 0 -m 64", "Write a long poem about the sea.")
    assert isinstance(result, VllmResult)
    sampling = submitted[-1]["sampling"]
    assert sampling.temperature == 0 and sampling.max_tokens == 64
    assert 0 < result.tokens <= 64 and result.text
    # streaming: the live output was updated many times while the 64 tokens came in
    live_ids = {c["display_id"] for c in pub.updates()}
    assert len(live_ids) == 1
    assert len(pub.updates()) > 3
    assert any(c["data"].get("text/plain", "").endswith("▌") for c in pub.updates())
    # final rendering: the live output ends empty, the answer and the stats are new outputs
    assert pub.updates()[-1]["data"] == {"text/plain": ""}
    answer, stats = pub.outputs()[-2:]
    assert answer["text/markdown"] == result.text
    assert stats["text/plain"].startswith(f"{result.tokens} tokens · TTFT ")
    assert "tok/s" in stats["text/plain"]
    assert result.ttft is not None and result.tokens_per_second
    assert repr(result).startswith("VllmResult(") and "tokens=" in repr(result)


def test_greedy_answer_knows_paris_and_keeps_the_exact_prompt(ip, pub, engine):
    result = vllm(ip, "-t 0 -m 32", QUESTION)
    assert "Paris" in result.text and str(result) == result.text
    assert result.prompt == engine.render_prompt(QUESTION)
    assert result.user_prompt == QUESTION
    assert result.finish_reason == "stop" and not result.interrupted
    assert result.metrics["tokens"] == result.tokens == len(result.token_ids)
    pub.clear()
    result.show("text")
    assert pub.outputs() == [{"text/plain": result.text}]


def test_max_tokens_bounds_the_answer(ip, submitted):
    result = vllm(ip, "-t 0 -m 5", "Tell me a long story about a dragon.")
    assert submitted[-1]["sampling"].max_tokens == 5
    assert result.tokens <= 5 and result.finish_reason == "length"


def test_stop_string_ends_the_answer(ip, submitted):
    full = vllm(ip, "-t 0 -m 32 --quiet", QUESTION)
    assert "Paris" in full.text
    stopped = vllm(ip, "-t 0 -m 32 --stop Paris --stop 'never seen'", QUESTION)
    assert submitted[-1]["sampling"].stop == ["Paris", "never seen"]
    assert "Paris" not in stopped.text and stopped.finish_reason == "stop"
    assert full.text.startswith(stopped.text)


def test_seed_with_temperature_one_repeats(ip, submitted):
    first = vllm(ip, "-t 1 --seed 1234 -m 24", "Invent a name for a cat.")
    second = vllm(ip, "-t 1 --seed 1234 -m 24", "Invent a name for a cat.")
    assert submitted[-1]["sampling"].seed == 1234 and submitted[-1]["sampling"].temperature == 1
    assert first.text == second.text and first.token_ids == second.token_ids


def test_every_sampling_flag_reaches_the_engine(ip, submitted):
    result = vllm(ip, "--top-p 0.9 --top-k 20 --min-p 0.05 -t 0.5 -m 8 -n 2 --seed 7 "
                      "--presence-penalty 0.5 --frequency-penalty 0.25 --repetition-penalty 1.1", QUESTION)
    sampling = submitted[-1]["sampling"]
    assert (sampling.top_p, sampling.top_k, sampling.min_p, sampling.temperature) == (0.9, 20, 0.05, 0.5)
    assert (sampling.max_tokens, sampling.n, sampling.seed) == (8, 2, 7)
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.repetition_penalty) == (0.5, 0.25, 1.1)
    assert len(result.texts) == 2 and all(result.texts)
    assert result.sampling_params is sampling


def test_system_flag_reaches_the_prompt_and_raw_skips_the_template(ip, engine):
    chat = vllm(ip, "-t 0 -m 8 --system 'You are a pirate.' --show-prompt --quiet", QUESTION)
    assert "You are a pirate." in chat.prompt and QUESTION in chat.prompt
    raw = vllm(ip, "--raw -t 0 -m 8 --quiet", "The capital of France is")
    assert raw.prompt == "The capital of France is"
    assert raw.prompt != engine.render_prompt("The capital of France is")


def test_show_prompt_displays_the_templated_prompt(ip, pub, engine):
    vllm(ip, "-t 0 -m 4 --show-prompt --quiet", QUESTION)
    assert pub.outputs()[0] == {"text/plain": engine.render_prompt(QUESTION)}


def test_quiet_hides_the_stats_line(ip, pub):
    result = vllm(ip, "-t 0 -m 8 --quiet", QUESTION)
    outputs = [o for o in pub.outputs() if o != {"text/plain": ""}]
    assert outputs == [{"text/plain": result.text, "text/markdown": result.text}]


@pytest.mark.parametrize("fmt", ["text", "code"])
def test_format_text_is_plain_and_code_is_one_code_block(ip, pub, fmt):
    result = vllm(ip, f"-t 0 -m 12 --quiet --format {fmt}", QUESTION)
    final = pub.outputs()[-1]
    assert final["text/plain"] == result.text
    if fmt == "text":
        assert "text/markdown" not in final
    else:
        assert "```" not in result.text  # a plain answer becomes one code block
        assert final["text/markdown"] == f"```\n{result.text}\n```"


# ----- structured output -----------------------------------------------------------------------

def test_choice_returns_one_of_the_choices(ip, submitted):
    result = vllm(ip, "-t 0 --choice 'Paris, London,Rome'", QUESTION)
    assert submitted[-1]["choice"] == ["Paris", "London", "Rome"]  # (vLLM compiles it into a grammar)
    assert result.text in ("Paris", "London", "Rome") and result.parsed == result.text


def test_json_inline_schema_gives_valid_json(ip, pub, submitted):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    result = vllm(ip, f"-t 0 -m 64 --json '{json.dumps(schema)}'", "Name the capital of France as JSON.")
    sent = submitted[-1]["sampling"].structured_outputs.json
    assert (json.loads(sent) if isinstance(sent, str) else sent) == schema
    data = json.loads(result.text)
    assert set(data) == {"city", "country"} and all(isinstance(v, str) for v in data.values())
    assert result.parsed == data
    final = pub.outputs()[-2]  # the answer, then the stats line
    assert final["text/markdown"].startswith("```json") and json.loads(final["text/plain"]) == data


def test_json_schema_from_a_pydantic_model_in_the_namespace_parses_into_it(ip):
    import pydantic

    class Capital(pydantic.BaseModel):
        city: str
        country: str

    ip.user_ns["Capital"] = Capital
    result = vllm(ip, "-t 0 -m 64 --quiet --json Capital", "Name the capital of France as JSON.")
    assert isinstance(result.parsed, Capital) and result.parsed.city
    del ip.user_ns["Capital"]


def test_regex_constrains_the_answer(ip, submitted):
    import re

    result = vllm(ip, "-t 0 -m 8 --regex '[0-9]{4}'", "In which year did the Second World War end?")
    assert submitted[-1]["sampling"].structured_outputs.regex == "[0-9]{4}"
    assert re.fullmatch(r"[0-9]{4}", result.text) and result.parsed == result.text


# ----- prompts: names, batches, outputs, conversation ------------------------------------------------

def test_names_are_interpolated_from_the_namespace(ip):
    ip.user_ns["country"] = "France"
    result = vllm(ip, "-t 0 -m 32 --quiet", "What is the capital of {country}? Answer with {{one}} word.")
    assert result.user_prompt == "What is the capital of France? Answer with {one} word."
    assert "France" in result.prompt and "Paris" in result.text


def test_batch_is_sent_together_and_stored_with_out(ip, pub, submitted):
    cell = "What is the capital of France?\n---\nWhat is the capital of Italy?\n---\nWhat is 2 + 2?"
    results = vllm(ip, "-t 0 -m 24 --out answers", cell)
    assert len(submitted) == 1 and len(submitted[-1]["prompts"]) == 3
    assert isinstance(results, list) and len(results) == 3
    assert ip.user_ns["answers"] is results
    assert [r.user_prompt for r in results] == cell.split("\n---\n")
    assert all(r.user_prompt in r.prompt and r.text for r in results)
    assert "Paris" in results[0].text
    labels = [o["text/markdown"].split("\n")[0] for o in pub.outputs() if "text/markdown" in o
              and o["text/markdown"].startswith("**[")]
    assert labels == ["**[1] What is the capital of France?**", "**[2] What is the capital of Italy?**",
                      "**[3] What is 2 + 2?**"]


def test_out_stores_the_result(ip):
    result = vllm(ip, "-t 0 -m 16 --quiet --out answer", QUESTION)
    assert ip.user_ns["answer"] is result


def test_continue_keeps_the_conversation_across_cells(ip, magics, capsys):
    ip.run_line_magic("vllm_reset", "")
    first = vllm(ip, "-c -t 0 -m 32 --quiet", "My name is Alice and I live in Paris.")
    second = vllm(ip, "--continue -t 0 -m 32 --quiet", "What is my name?")
    assert "Alice" in second.prompt and first.text in second.prompt
    assert [m["role"] for m in magics.conversation] == ["user", "assistant", "user", "assistant"]
    assert magics.conversation[-1]["content"] == second.text
    single = vllm(ip, "-t 0 -m 8 --quiet", "What is my name?")
    assert "Alice" not in single.prompt  # plain %%vllm is single-turn
    ip.run_line_magic("vllm_reset", "")
    assert magics.conversation == [] and "2 turns" in capsys.readouterr().out


# ----- configuration ---------------------------------------------------------------------------------

def test_config_traits_are_the_session_defaults_both_ways(ip, magics, engine, submitted):
    ip.run_line_magic("config", "VllmMagics.temperature = 0.2")
    ip.run_line_magic("config", "VllmMagics.max_tokens = 6")
    assert engine.defaults.temperature == 0.2
    result = vllm(ip, "--quiet", QUESTION)
    assert submitted[-1]["sampling"].temperature == pytest.approx(0.2)
    assert submitted[-1]["sampling"].max_tokens == 6 and result.tokens <= 6
    engine.defaults.top_k = 11  # as the widgets do
    assert magics.top_k == 11
    ip.run_line_magic("vllm_reset", "--defaults")
    assert magics.temperature == engine.defaults.temperature == 0.7


def test_out_of_range_config_is_refused_and_keeps_the_value(ip, magics, engine):
    from traitlets import TraitError

    before = engine.defaults.temperature
    with pytest.raises(TraitError, match="temperature"):
        magics.temperature = 5.0
    assert engine.defaults.temperature == magics.temperature == before


# ----- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("line, cell, message", [
    ("--no-such-flag", QUESTION, "unrecognized arguments: --no-such-flag; %%vllm takes"),
    ("-t hot", QUESTION, "argument -t/--temperature: invalid float value: 'hot'"),
    ("--top-p 3", QUESTION, "invalid sampling value: top_p must be in"),
    ("-t 0", "What is the capital of {nowhere}?", "name 'nowhere' is not defined"),
    ("--json '{\"type\": \"object\", '", QUESTION, "invalid JSON schema"),
    ("--json '{\"type\": \"nothing\"}'", QUESTION, "invalid JSON schema"),
    ("--json no_such_schema", QUESTION, "no_such_schema: no such name"),
    ("--choice a,b --regex x", QUESTION, "use one of --json, --regex and --choice"),
    ("-c", "one\n---\ntwo", "--continue takes one prompt"),
    ("", "one\n---\n---\ntwo", "a prompt of the batch is empty"),
])
def test_user_mistakes_are_usage_errors_and_the_engine_keeps_answering(ip, line, cell, message):
    with pytest.raises(UsageError) as info:
        vllm(ip, line, cell)
    assert type(info.value) is UsageError
    assert message in str(info.value)
    assert_still_answers(ip)


def test_prompt_longer_than_the_context_is_a_usage_error(ip, engine):
    too_long = "word " * (engine.status().max_model_len + 10)
    with pytest.raises(UsageError, match="the prompt has .* tokens but the model's context holds"):
        vllm(ip, "-t 0", too_long)
    assert_still_answers(ip)


def test_no_model_loaded_says_what_to_run(ip):
    magics = VllmMagics(shell=ip, session=EngineSession())
    try:
        with pytest.raises(UsageError, match=r"no model is loaded: run %vllm_load"):
            magics.vllm("-t 0", QUESTION)
    finally:
        magics.close()
    assert_still_answers(ip)


def test_package_errors_raised_by_code_in_a_cell_show_as_one_line(ip, monkeypatch):
    shown = []  # what a kernel sends as the error's traceback (ipykernel overrides this same method)
    monkeypatch.setattr(ip, "_showtraceback", lambda etype, evalue, stb: shown.append(stb))
    result = ip.run_cell("from vllm_magic.langchain import VLLM\nVLLM.from_session().invoke('Hi', temprature=0)")
    assert type(result.error_in_exec).__name__ == "RequestError"
    assert len(shown) == 1 and len(shown[0]) == 1, shown
    assert shown[0][0].startswith("RequestError: VLLM does not know the option(s) temprature")
    assert_still_answers(ip)


# ----- interrupts ------------------------------------------------------------------------------

def test_interrupt_from_the_display_keeps_the_partial_answer(ip, pub, engine):
    def interrupt_on_third_update(count):
        if count == 3:
            raise KeyboardInterrupt

    pub.on_update = interrupt_on_third_update
    with pytest.raises(UsageError, match="interrupted: the request was aborted in the engine; the partial result is in partial"):
        vllm(ip, "-t 0 -m 256 --out partial", "Write a very long story about a dragon and a knight.")
    pub.on_update = None
    result = ip.user_ns["partial"]
    assert result.interrupted and 0 < result.tokens < 256 and result.text
    assert engine.status().requests_live == 0
    answer, stats = pub.outputs()[-2:]
    assert answer["text/plain"] == result.text
    assert stats["text/plain"].endswith("⏹ interrupted")
    assert_still_answers(ip)


def test_kernel_interrupt_aborts_the_request_in_the_engine(ip, pub, engine, kernel_sigint):
    served = engine.requests_served
    streaming = threading.Event()

    def interrupt_once_streaming():
        if streaming.wait(60):
            _thread.interrupt_main()  # what the kernel's interrupt does: SIGINT in the main thread

    pub.on_update = lambda count: count >= 2 and streaming.set()  # the answer is streaming
    thread = threading.Thread(target=interrupt_once_streaming, daemon=True)
    thread.start()
    with pytest.raises(UsageError, match="^interrupted: the request was aborted in the engine$"):
        vllm(ip, "-t 0 -m 400 --quiet", "Write a very long story about a dragon and a knight.")
    pub.on_update = None
    thread.join(5)
    result = engine.last_result  # the cell ended in an error, so Out[] has nothing: ask the session
    assert result.aborted and 0 < result.output_tokens < 400
    assert engine.status().requests_live == 0 and engine.requests_served == served + 1
    assert_still_answers(ip)


def test_terminal_shell_prints_the_answer_as_it_streams(ip, engine, capsys, monkeypatch):
    import sys

    from IPython.core.displaypub import DisplayPublisher

    writes = []  # (text, requests finished so far) of every write to stdout

    class Recorder:
        def __init__(self, stream):
            self.stream = stream

        def write(self, text):
            writes.append((text, engine.requests_served))
            return self.stream.write(text)

        def __getattr__(self, name):
            return getattr(self.stream, name)

    served = engine.requests_served
    monkeypatch.setattr(sys, "stdout", Recorder(sys.stdout))
    recording = ip.display_pub
    ip.display_pub = DisplayPublisher(shell=ip)  # what terminal IPython has: no in-place updates
    try:
        result = vllm(ip, "-t 0 -m 48", "Write a long poem about the sea.")
    finally:
        ip.display_pub = recording
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert out.startswith(result.text + "\n") and "▌" not in out
    assert f"{result.tokens} tokens · TTFT" in out
    printed = [text for text, _ in writes if text]
    assert printed[0] and result.text.startswith(printed[0]) and len(printed) > 2
    assert writes[0][1] == served, "the first text was printed only after the request finished"
