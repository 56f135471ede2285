"""Reasoning kept apart from the answer by vLLM's reasoning parser, on the real demo-model engine.

No small reasoning model is at hand: the demo model is made to write a think-tagged answer with a
regex (structured outputs), so vLLM's ``qwen3`` parser runs on a real engine's output.
"""

from __future__ import annotations

import asyncio

import pytest
from IPython.core.error import UsageError

from ipython_capture import make_shell
from vllm_magic.engine.config import Parsers
from vllm_magic.errors import ConfigError
from vllm_magic.langchain import ChatVLLM

THINK = r"<think>[a-z]{2,10}( [a-z]{2,10}){2,6}</think>[A-Z][A-Za-z ,]{5,60}\."


@pytest.fixture
def thinking(engine):
    engine.parsers = Parsers(reasoning="qwen3")
    yield engine
    engine.parsers = Parsers()


def test_parser_names_are_checked_against_vllms_parsers():
    assert Parsers(reasoning="qwen3", tool_call="hermes").check() == Parsers(reasoning="qwen3", tool_call="hermes")
    with pytest.raises(ConfigError, match="has no reasoning parser 'nope'.*qwen3"):
        Parsers(reasoning="nope").check()


def test_the_session_splits_thinking_from_the_answer_as_it_streams(thinking):
    handle = thinking.submit("What is two plus two? Think first.", temperature=0, max_tokens=80, regex=THINK)[0]
    parts = list(handle.iter_parts())
    result = handle.result(timeout=300)
    assert result.reasoning.strip() and result.text.strip() and "<think>" not in result.text + result.reasoning
    assert "</think>" not in result.text + result.reasoning
    assert [reasoning for _, _, reasoning in parts] == sorted((r for _, _, r in parts), reverse=True)  # thinking first
    assert "".join(t for _, t, r in parts if r) == result.reasoning
    assert "".join(t for _, t, r in parts if not r) == result.text


def test_chat_vllm_puts_thinking_in_reasoning_content_invoke_stream_and_async(thinking):
    chat = ChatVLLM(temperature=0, max_tokens=80)
    message = chat.invoke("What is two plus two? Think first.", regex=THINK)
    assert message.additional_kwargs["reasoning_content"] and "<think>" not in message.content
    assert message.content_blocks[0] == {"type": "reasoning", "reasoning": message.additional_kwargs["reasoning_content"]}
    chunks = list(chat.stream("What is two plus two? Think first.", regex=THINK))
    assert chunks[0].additional_kwargs.get("reasoning_content")  # thinking streams as it arrives
    streamed = chunks[0]
    for chunk in chunks[1:]:
        streamed += chunk
    assert streamed.additional_kwargs["reasoning_content"] == message.additional_kwargs["reasoning_content"]
    assert streamed.content == message.content
    awaited = asyncio.run(chat.ainvoke("What is two plus two? Think first.", regex=THINK))
    assert awaited.additional_kwargs["reasoning_content"] == message.additional_kwargs["reasoning_content"]


def test_a_cell_shows_thinking_in_a_collapsed_block_above_the_answer(engine):
    ip, publisher = make_shell()
    ip.run_line_magic("load_ext", "vllm_magic")
    try:
        ip.run_line_magic("vllm_load", "--reasoning-parser qwen3 --no-controls")
        assert engine.parsers == Parsers(reasoning="qwen3")
        result = ip.run_cell_magic("vllm", f"-t 0 -m 80 --regex '{THINK}'", "What is two plus two? Think first.")
        assert result.reasoning.strip() and result.text.strip() and "<think>" not in result.text
        markdown = [o["text/markdown"] for o in publisher.outputs() if "text/markdown" in o][-1]
        assert markdown.startswith("<details><summary>💭 Thinking</summary>")
        assert markdown.index(result.reasoning.strip()) < markdown.index("</details>") < markdown.index(result.text.strip())
        with pytest.raises(UsageError, match="no such switch"):
            ip.run_cell_magic("vllm", "--no-think", "Hi")
        ip.run_line_magic("vllm_load", "--no-controls")
        assert engine.parsers == Parsers()
    finally:
        from vllm_magic.magics import unregister

        unregister(ip, shutdown=False)
        type(ip).clear_instance()
        engine.parsers = Parsers()


def test_choosing_a_parser_keeps_the_live_engine(engine):
    ip, _ = make_shell()
    ip.run_line_magic("load_ext", "vllm_magic")
    try:
        created = engine.engines_created
        ip.run_line_magic("vllm_load", "--reasoning-parser qwen3 --tool-call-parser hermes --no-controls")
        assert engine.engines_created == created and engine.parsers == Parsers("qwen3", "hermes")
        with pytest.raises(UsageError, match="no tool call parser 'nope'"):
            ip.run_line_magic("vllm_load", "--tool-call-parser nope --no-controls")
    finally:
        from vllm_magic.magics import unregister

        unregister(ip, shutdown=False)
        type(ip).clear_instance()
        engine.parsers = Parsers()


def test_a_thinking_budget_on_an_engine_without_reasoning_config_is_one_line(engine, ip):
    with pytest.raises(UsageError) as caught:
        ip.run_cell_magic("vllm", "--thinking-budget 10", "What is two plus two?")
    assert "--reasoning-config" in str(caught.value) and "\n" not in str(caught.value)
    assert "Paris" in engine.generate("What is the capital of France?", temperature=0, max_tokens=16).text
