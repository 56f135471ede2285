"""LangChain's own standard test suites for ``ChatVLLM``, against the demo model.

Tool calling is on, with ``tool_choice="any"`` forcing calls (decoding held to the tools' schemas,
which a 135M model needs). What the model cannot do is declared through the suites' capability
flags: no image, audio or PDF input, no per-call model override (one engine per kernel).
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from vllm_magic.langchain import ChatVLLM


class DemoModelLimit(Exception):
    """A standard test failed exactly where the 135M demo model is known to fail it."""


@contextmanager
def _known_failure(mark: str) -> Iterator[None]:
    """Turn the one expected AssertionError (its message or its failing source line contains ``mark``)
    into :class:`DemoModelLimit`; any other failure, a real bug included, fails the test as it is."""
    try:
        yield
    except AssertionError as error:
        line = traceback.extract_tb(error.__traceback__)[-1].line or ""
        if mark in line or mark in str(error):
            raise DemoModelLimit(f"{line}\n{error}") from error
        raise


class _ChatVLLMCapabilities:
    @pytest.fixture(autouse=True)
    def _live_engine(self, engine):
        """Constructing ChatVLLM attaches to the session's engine: load it once for the run."""
        return engine

    @property
    def chat_model_class(self) -> type[ChatVLLM]:
        return ChatVLLM

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": "SmolLM2-135M-Instruct", "temperature": 0}

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def tool_choice_value(self) -> str | None:
        return "any"

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "json_schema"}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False


class TestChatVLLMUnit(_ChatVLLMCapabilities, ChatModelUnitTests):
    pass


class TestChatVLLMIntegration(_ChatVLLMCapabilities, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Greedy, and room for whole JSON answers from a 135M model (the unit suite sets its own).
        return {**super().chat_model_params, "max_tokens": 256}

    @pytest.mark.xfail(reason="with tool_choice 'auto' the 135M demo model answers in text instead of choosing "
                              "to call the tool (forced calls are tested by test_tool_calling)",
                       raises=DemoModelLimit, strict=True)
    def test_agent_loop(self, model: Any) -> None:
        with _known_failure('block["type"] == "tool_call"'):  # the first answer has no tool call
            super().test_agent_loop(model)

    @pytest.mark.xfail(reason="the 135M demo model's forced call repeats the Chinese name in an unending string "
                              "until max_tokens, leaving an invalid tool call", raises=DemoModelLimit, strict=True)
    def test_unicode_tool_call_integration(self, model: Any, *, tool_choice: str | None = None,
                                           force_tool_call: bool = True) -> None:
        with _known_failure("Expected at least 1 tool call, got 0"):  # the one call is in invalid_tool_calls
            super().test_unicode_tool_call_integration(model, tool_choice=tool_choice,
                                                       force_tool_call=force_tool_call)
