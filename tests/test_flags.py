"""A magic line's ``vllm serve`` flags, split and read by vLLM's own parsers (no engine started)."""

from __future__ import annotations

import pytest

from vllm_magic.engine.flags import serve_cli_flags
from vllm_magic.engine.flags import FlagError, VllmFlags, load_flags, remote_flags, serve_flags, split_line
from vllm_magic.engine.config import Parsers
from vllm_magic.errors import ConfigError

OWN = {"--as": True, "--verbose": False}


def test_a_line_splits_into_own_flags_model_and_vllm_flags():
    line = split_line(["org/m", "--as", "x", "--max-model-len=3", "--verbose", "--dtype", "half"], OWN)
    assert (line.own, line.model, line.vllm, line.help) == (
        ["--as", "x", "--verbose"], "org/m", ["--max-model-len=3", "--dtype", "half"], False)
    assert split_line(["--as=x", "--enforce-eager"], OWN).own == ["--as=x"]
    assert split_line(["--dtype", "half", "org/m"], OWN).model is None  # the model comes first or not at all
    assert split_line(["--verbose", "-h"], OWN).help


def test_an_own_flag_at_the_end_without_its_value_is_refused():
    with pytest.raises(FlagError, match="^--as needs a value$"):
        split_line(["--verbose", "--as"], OWN)


def test_engine_flags_keep_only_those_given_in_either_spelling():
    flags = load_flags("--max-model-len 2048 --dtype=float16 --enforce-eager --no-enable-prefix-caching")
    assert flags == VllmFlags(engine={"max_model_len": 2048, "dtype": "float16", "enforce_eager": True,
                                      "enable_prefix_caching": False})
    assert load_flags([]) == VllmFlags()


def test_the_model_comes_first_or_as_a_flag_and_once():
    assert load_flags(["--model", "org/m", "--max-model-len", "64"]) == VllmFlags("org/m", {"max_model_len": 64})
    assert load_flags(["--model=org/m"]).model == "org/m"
    assert load_flags(["--model", "org/m"], "org/m").model == "org/m"
    assert load_flags(["--max-model-len", "64"], "org/m").model == "org/m"
    with pytest.raises(FlagError, match=r"model is given twice \(org/a and --model org/b\)"):
        load_flags(["--model", "org/b"], "org/a")
    with pytest.raises(FlagError, match="--model needs a model name"):
        load_flags(["--model"])


def test_parser_flags_name_the_sessions_parsers_and_are_not_engine_flags():
    flags = load_flags(["--max-model-len", "2048", "--reasoning-parser", "qwen3", "--tool-call-parser=hermes",
                        "--enable-auto-tool-choice"])
    assert flags.parsers == Parsers(reasoning="qwen3", tool_call="hermes")
    assert flags.engine == {"max_model_len": 2048}
    with pytest.raises(FlagError, match="has no reasoning parser 'nope'.*qwen3"):
        load_flags(["--reasoning-parser", "nope"])
    for missing in (["--reasoning-parser"], ["--tool-call-parser", "--enforce-eager"]):
        with pytest.raises(FlagError, match="needs a parser name"):
            load_flags(missing)


@pytest.mark.parametrize("argv, message", [
    (["--max-modle-len", "1024"], r"^unrecognized engine arguments: --max-modle-len 1024 \(%vllm_load takes every "
                                  r"`vllm serve` engine flag; see `vllm serve --help`\)$"),
    (["--max-model-len", "lots"], "max-model-len: invalid .*'lots'"),
    (["--enforce-eager", "--max-model-len"], "max-model-len: expected one argument"),
])
def test_engine_flag_mistakes_are_one_line_flag_errors(argv, message):
    with pytest.raises(FlagError, match=message) as info:
        load_flags(argv)
    assert isinstance(info.value, ConfigError) and "\n" not in str(info.value)


def test_a_remote_session_takes_the_model_and_parsers_but_no_engine_flags():
    assert remote_flags(["--model", "org/m"]) == VllmFlags("org/m")
    assert remote_flags("--tool-call-parser hermes").parsers == Parsers(tool_call="hermes")
    with pytest.raises(FlagError, match=r"engine flags \(--max-model-len 512\) shape an engine started here"):
        remote_flags(["--max-model-len", "512"], "org/m")


def test_serve_flags_split_into_engine_and_server_ones_and_render_back():
    flags = serve_flags("--max-model-len 2048 --enforce-eager --no-enable-prefix-caching --served-model-name smol "
                        "--enable-auto-tool-choice "
                        "--tool-call-parser hermes --reasoning-parser qwen3 --hf-overrides '{\"a\": 1}' --model org/m")
    assert flags.model == "org/m" and flags.parsers == Parsers()  # the server applies its parsers itself
    assert flags.engine == {"max_model_len": 2048, "enforce_eager": True, "enable_prefix_caching": False,
                            "served_model_name": ["smol"],
                            "reasoning_parser": "qwen3", "hf_overrides": {"a": 1}}
    assert flags.server == {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}
    again = serve_flags(serve_cli_flags({**flags.engine, **flags.server}))
    assert (again.engine, again.server) == (flags.engine, flags.server)
    with pytest.raises(FlagError, match=r"^unrecognized flags: --no-such-flag \(`vllm serve --help` lists them\) "
                                        r"\(%vllm_serve takes every `vllm serve` flag\)$"):
        serve_flags("--no-such-flag")
    with pytest.raises(FlagError, match="expected one argument"):
        serve_flags(["--served-model-name", "smol", "--port"])


def test_logprobs_engine_flags_reach_the_engine_arguments():
    flags = load_flags("--logprobs-mode processed_logprobs --max-logprobs 50")
    assert flags.engine == {"logprobs_mode": "processed_logprobs", "max_logprobs": 50}
