"""A LangChain object that asks for another engine configuration replaces the live engine.

Two engine loads: kept in its own module, and the default engine is restored at the end.
"""

from __future__ import annotations

import pytest

import demo_engine
from vllm_magic.errors import RequestError

from vllm_magic.langchain import VLLM

# Over the suite's 15 min default: two engine starts: the switch, then the demo engine again.
pytestmark = pytest.mark.timeout(1800)

FRANCE = "What is the capital of France?"


def test_a_different_engine_configuration_replaces_the_live_engine(engine):
    created = engine.engines_created
    default_llm = VLLM(temperature=0, max_new_tokens=16)
    try:
        small = VLLM(temperature=0, max_new_tokens=16, vllm_kwargs={"max_model_len": 2048})
        assert engine.engines_created == created + 1  # replaced, not added: one engine in the process
        assert engine.status().max_model_len == 2048
        assert "Paris" in small.invoke(FRANCE)
        assert "Paris" in default_llm.invoke(FRANCE)  # it asked for no engine argument: the live one serves it
    finally:
        demo_engine.restore(engine)  # the default configuration again, for the other tests
    assert engine.engines_created == created + 2
    with pytest.raises(RequestError, match="live engine"):
        small.invoke(FRANCE)  # built for max_model_len=2048; a call never replaces what was loaded since
    assert "Paris" in default_llm.invoke(FRANCE)
