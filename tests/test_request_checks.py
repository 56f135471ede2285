"""One request path: a batch crosses the backend seam once, and what no front-end may ask is refused
by the session with the same one line for Python, ``%%vllm``, ``VLLM`` and ``ChatVLLM`` (real demo engine)."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError

from vllm_magic.engine.config import Parsers
from vllm_magic.errors import ConfigError, RequestError
from vllm_magic.langchain import VLLM, ChatVLLM

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


@pytest.fixture
def prepare_calls(engine, monkeypatch):
    """Counts the batches that reach the backend's one prepare step (the real step runs)."""
    backend = engine.backend
    calls: list[int] = []
    real = backend.prepare_requests

    def spy(prompts, options, defaults):
        calls.append(len(prompts))
        return real(prompts, options, defaults)

    monkeypatch.setattr(backend, "prepare_requests", spy)
    return calls


def test_one_submit_prepares_its_whole_batch_in_one_backend_call(engine, prepare_calls):
    conversation = [{"role": "user", "content": "Weather in Paris?"}]
    handles = engine.submit(["Say hi.", "Say bye.", conversation], temperature=0, max_tokens=4, tools=[TOOL])
    results = [h.result(timeout=300) for h in handles]
    assert prepare_calls == [3]
    assert all(r.output_tokens > 0 for r in results)
    assert all(r.prompt_tokens > 0 for r in results)


def test_a_cell_batch_prepares_once(ip, prepare_calls):
    results = ip.run_cell_magic("vllm", "-t 0 -m 4 --quiet", "Say hi.\n---\nSay bye.\n---\nSay yes.")
    assert prepare_calls == [3]
    assert len(results) == 3 and all(r.generation.output_tokens > 0 for r in results)


def test_a_thinking_switch_on_a_template_without_one_is_the_same_line_everywhere(engine, ip):
    # The demo model's chat template has no enable_thinking switch.
    with pytest.raises(RequestError, match="no such switch") as direct:
        engine.submit("Hi", chat_template_kwargs={"enable_thinking": False})
    with pytest.raises(UsageError) as cell:
        ip.run_cell_magic("vllm", "--no-think", "Hi")
    with pytest.raises(RequestError) as chat:
        ChatVLLM(max_tokens=4).invoke("Hi", chat_template_kwargs={"enable_thinking": False})
    assert str(cell.value) == str(direct.value) == str(chat.value)
    assert "\n" not in str(direct.value)
    assert engine.generate("What is the capital of France?", temperature=0, max_tokens=16).output_tokens > 0


def test_a_thinking_budget_without_reasoning_config_is_the_same_line_everywhere(engine, ip):
    with pytest.raises(RequestError) as direct:
        engine.submit("Hi", thinking_token_budget=5)
    with pytest.raises(UsageError) as cell:
        ip.run_cell_magic("vllm", "--thinking-budget 5", "Hi")
    with pytest.raises(RequestError) as llm:
        VLLM(max_tokens=4).invoke("Hi", thinking_token_budget=5)
    assert str(cell.value) == str(direct.value) == str(llm.value)
    assert "\n" not in str(direct.value)
    assert engine.status().requests_live == 0


def test_an_adapter_on_an_engine_without_enable_lora_is_the_same_line_everywhere(engine, ip, tmp_path):
    with pytest.raises(RequestError, match="--lora pirate: LoRA adapters need an engine started with --enable-lora") \
            as direct:
        engine.submit("Hi", lora="pirate")
    with pytest.raises(UsageError) as cell:
        ip.run_cell_magic("vllm", "--lora pirate", "Hi")
    with pytest.raises(RequestError) as llm:
        VLLM(max_tokens=4).invoke("Hi", lora="pirate")
    assert str(cell.value) == str(direct.value) == str(llm.value)
    with pytest.raises(RequestError, match="^LoRA adapters need an engine started with --enable-lora: %vllm_load "
                                           "MODEL --enable-lora --max-lora-rank R"):
        engine.add_lora("pirate", tmp_path)
    assert engine.generate("Hi", temperature=0, max_tokens=4, lora="base").output_tokens > 0
    assert engine.status().adapters is None and engine.status().requests_live == 0


def test_a_negative_thinking_budget_is_refused_by_the_session(engine):
    with pytest.raises(RequestError, match="0 or more"):
        engine.submit("Hi", thinking_token_budget=-1)


def test_two_answer_constraints_at_once_are_refused_before_the_engine(engine):
    served = engine.requests_served
    with pytest.raises(RequestError, match="one of json_schema, regex and choice"):
        engine.submit("Yes or no?", regex="(yes|no)", choice=["yes", "no"])
    with pytest.raises(RequestError, match="one of json_schema, regex and choice"):
        VLLM(max_tokens=4).invoke("Yes or no?", regex="(yes|no)", choice=["yes", "no"])
    assert engine.requests_served == served


def test_unknown_parser_names_are_refused_and_the_parsers_stay(engine):
    before = engine.parsers
    with pytest.raises(ConfigError, match="no tool call parser 'nope'"):
        engine.parsers = Parsers(tool_call="nope")
    assert engine.parsers == before
