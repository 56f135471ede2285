"""``%vllm_load`` puts a LangChain ``VLLM`` over the live engine into the namespace."""

from __future__ import annotations

from vllm_magic.langchain import VLLM

FRANCE = "What is the capital of France?"


def test_vllm_load_publishes_llm_over_the_live_engine(ip, engine):
    created = engine.engines_created
    ip.run_line_magic("vllm_load", "--no-controls")
    llm = ip.user_ns["llm"]
    assert isinstance(llm, VLLM) and llm.engine_session is engine
    assert "Paris" in llm.invoke(FRANCE, temperature=0, max_new_tokens=16)
    ip.run_line_magic("vllm_load", "--no-controls --as my_llm")
    assert isinstance(ip.user_ns["my_llm"], VLLM)
    ip.run_cell("from langchain_core.prompts import PromptTemplate\n"
                "chain = PromptTemplate.from_template('What is the capital of {country}?')"
                " | my_llm.bind(temperature=0, max_new_tokens=16)\n"
                "answer = chain.invoke({'country': 'France'})")
    assert "Paris" in ip.user_ns["answer"]
    assert engine.engines_created == created
