"""Pure logic of the magics: argument splitting, prompt interpolation, batches, schemas, rendering.

No engine here: these are the pieces that run before anything is submitted.
"""

from __future__ import annotations

import json

import pytest
from IPython.core.error import UsageError

from vllm_magic.magics.display import answer_bundle
from vllm_magic.engine.requests.handles import Completion, GenerationResult
from vllm_magic.magics import VllmMagics
from vllm_magic.magics.args import _own_flags, split_vllm_line
from vllm_magic.magics.cells import PromptError, interpolate, parse_choices, resolve_json_schema, split_batch


def test_load_line_splits_our_flags_model_and_engine_flags():
    args, line = split_vllm_line(VllmMagics.vllm_load,
                                 "org/model --as chat --max-model-len 2048 --verbose --dtype=float16")
    assert line.model == "org/model"
    assert line.own == ["--as", "chat", "--verbose"] and args.as_name == "chat" and args.verbose
    assert line.vllm == ["--max-model-len", "2048", "--dtype=float16"]


def test_load_line_without_model_keeps_flag_values_with_their_flags():
    args, line = split_vllm_line(VllmMagics.vllm_load, "--dtype float32 --no-controls --as=x")
    assert line.model is None
    assert line.vllm == ["--dtype", "float32"]
    assert line.own == ["--no-controls", "--as=x"] and args.as_name == "x" and args.no_controls


def test_load_flag_without_value_is_a_usage_error():
    with pytest.raises(UsageError, match="%vllm_load: --as needs a value"):
        split_vllm_line(VllmMagics.vllm_load, "--as")
    with pytest.raises(UsageError, match=r"%vllm_load\? shows the help"):
        split_vllm_line(VllmMagics.vllm_load, "org/model --help")


def test_serve_line_splits_its_own_flags_from_vllm_serve_flags():
    args, line = split_vllm_line(VllmMagics.vllm_serve, "--port 8001 --tool-call-parser hermes --handoff --api-key=k "
                                                        "--enable-auto-tool-choice")
    assert line.model is None
    assert line.own == ["--port", "8001", "--handoff", "--api-key=k"]
    assert args.port == 8001 and args.handoff and args.api_key == "k"
    assert line.vllm == ["--tool-call-parser", "hermes", "--enable-auto-tool-choice"]


def test_the_magics_own_flags_come_from_their_argument_declarations():
    for magic in (VllmMagics.vllm_load, VllmMagics.vllm_serve):
        own = _own_flags(magic)
        declared = [a for a in magic.parser._actions if a.option_strings]
        assert set(own) == {o for a in declared for o in a.option_strings}
    assert _own_flags(VllmMagics.vllm_load)["--as"] and not _own_flags(VllmMagics.vllm_load)["--keep"]
    assert _own_flags(VllmMagics.vllm_serve)["--lines"] and not _own_flags(VllmMagics.vllm_serve)["--stop"]


def test_interpolation_fills_names_and_keeps_escaped_braces():
    ns = {"city": "Paris", "n": 3, "d": {"k": "v"}}
    assert interpolate("{city} has {{braces}} and {n:02d} {d[k]}", ns) == "Paris has {braces} and 03 v"


def test_interpolation_names_the_missing_variable():
    with pytest.raises(PromptError, match="name 'country' is not defined"):
        interpolate("capital of {country}?", {})


@pytest.mark.parametrize("text", ["a { b", "a } b", "{}", "{0}"])
def test_unbalanced_or_positional_braces_are_prompt_errors(text):
    with pytest.raises(PromptError, match=r"\{\{"):
        interpolate(text, {})


def test_batch_splits_on_separator_lines_only():
    assert split_batch("one\n---\ntwo\n  ---  \nthree") == ["one", "two", "three"]
    assert split_batch("a --- b\n----\nc") == ["a --- b\n----\nc"]
    with pytest.raises(PromptError, match="empty"):
        split_batch("one\n---\n---\ntwo")
    with pytest.raises(PromptError, match="cell is empty"):
        split_batch("   \n")


def test_choices_are_comma_separated():
    assert parse_choices(" yes, no ,maybe") == ["yes", "no", "maybe"]
    with pytest.raises(PromptError):
        parse_choices(" , ")


def test_json_schema_from_inline_json_name_or_pydantic_model():
    import pydantic

    class City(pydantic.BaseModel):
        name: str
        population: int

    schema, parse = resolve_json_schema('{"type": "object"}', {})
    assert schema == {"type": "object"} and parse('{"a": 1}') == {"a": 1}
    schema, parse = resolve_json_schema("s", {"s": {"type": "array"}})
    assert schema == {"type": "array"}
    schema, parse = resolve_json_schema("City", {"City": City})
    assert schema["required"] == ["name", "population"]
    city = parse('{"name": "Paris", "population": 2100000}')
    assert isinstance(city, City) and city.population == 2100000


@pytest.mark.parametrize("spec, message", [
    ("nothing_here", "no such name"),
    ("{not json", "invalid JSON schema"),
    ('{"type": "no-such-type"}', "invalid JSON schema"),
    ("[1, 2]", "must be an object"),
])
def test_bad_json_schemas_are_prompt_errors(spec, message):
    with pytest.raises(PromptError, match=message):
        resolve_json_schema(spec, {})


def _result(text="Hi there", tokens=3, ttft=0.05, elapsed=0.25, aborted=False, finish="stop"):
    completion = Completion(0, text, list(range(tokens)), None if aborted else finish)
    return GenerationResult("r1", "p", [1, 2], [completion], ttft, elapsed, aborted=aborted)


def test_stats_line_reports_tokens_ttft_rate_and_interruption():
    line = _result().summary
    assert line == "3 tokens · TTFT 50 ms · 10.0 tok/s"
    assert _result(aborted=True).summary.endswith("⏹ interrupted")
    assert "max tokens" in _result(finish="length").summary


def test_answer_bundles_per_format():
    assert answer_bundle("**hi**") == {"text/plain": "**hi**", "text/markdown": "**hi**"}
    assert answer_bundle("x = 1", "code")["text/markdown"] == "```\nx = 1\n```"
    fenced = answer_bundle("Here:\n```python\ndef f():\n    return 1\n```\nThis returns 1.", "code")
    assert fenced == {"text/plain": "def f():\n    return 1", "text/markdown": "```python\ndef f():\n    return 1\n```"}
    unfinished = answer_bundle("```python\nx = 1\ny = ", "code")  # cut by max tokens
    assert unfinished["text/plain"] == "x = 1\ny = "
    assert "text/markdown" not in answer_bundle("plain", "text")
    rendered = answer_bundle('{"a":1}', "json")
    assert json.loads(rendered["text/plain"]) == {"a": 1} and rendered["text/markdown"].startswith("```json")
    assert answer_bundle("partial", streaming=True)["text/plain"].endswith("▌")


def test_help_of_the_magics_lists_our_flags_and_points_at_vllm_serve():
    load_help = " ".join(VllmMagics.vllm_load.__doc__.split())
    for flag in ("--as NAME", "--verbose", "--no-controls", "--remote URL", "vllm serve --help"):
        assert flag in load_help
    cell_help = " ".join(VllmMagics.vllm.__doc__.split())
    assert "%%vllm [--raw]" in cell_help
    for flag in ("-t TEMPERATURE, --temperature TEMPERATURE", "--stop TEXT", "--json SCHEMA", "--choice A,B,C",
                 "-c, --continue", "--out NAME", "--show-prompt", "--format {markdown,text,code,json}"):
        assert flag in cell_help


@pytest.mark.parametrize("line, message", [
    ("--idle-timeout 5m", "--idle-timeout says when a --persist engine ends: add --persist"),
    ("--persist --idle-timeout soon", "--idle-timeout takes a duration such as 90s, 15m or 2h"),
    ("--persist --remote http://127.0.0.1:1", "--persist is about an engine of this user"),
    ("--idle-timeout 5m --remote http://127.0.0.1:1", "--idle-timeout is about an engine of this user"),
    ("--embed --as emb", "--as is about the generation engine; it does not go with --embed"),
])
def test_persist_mistakes_are_one_line_before_anything_starts(line, message):
    from ipython_capture import make_shell
    from vllm_magic.engine.session import EngineSession
    from vllm_magic.magics import register, unregister

    shell, _ = make_shell()
    session = EngineSession()
    try:
        register(shell, session=session)
        with pytest.raises(UsageError, match=message.replace("(", r"\(")):
            shell.run_line_magic("vllm_load", line)
        assert not session.loaded
    finally:
        unregister(shell, shutdown=False)
        type(shell).clear_instance()
