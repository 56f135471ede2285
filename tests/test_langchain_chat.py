"""``ChatVLLM``: messages, streaming, usage and structured output over the live engine."""

from __future__ import annotations

import threading
from typing import Optional

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from vllm_magic.errors import RequestError
from langchain_core.messages import AIMessage, AIMessageChunk, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from pydantic import BaseModel, Field

from vllm_magic.demo.model import DEMO_MODEL_NAME
from vllm_magic.langchain import ChatVLLM
from vllm_magic.langchain.chat import messages_to_conversation

FRANCE = "What is the capital of France?"


class City(BaseModel):
    """A city and its country."""

    name: str = Field(description="the city's name")
    country: str = Field(description="the country it is in")
    population_millions: Optional[float] = Field(default=None, description="inhabitants, in millions")


# ----- message conversion (pure logic) ------------------------------------------------------------

def test_messages_become_a_conversation():
    conversation = messages_to_conversation([
        SystemMessage("Be brief."), HumanMessage("hi", name="example_user"), AIMessage("hello"),
        ChatMessage(role="user", content=[{"type": "text", "text": "how "}, {"type": "text", "text": "are you"}]),
    ])
    assert conversation == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you"},
    ]


def test_tool_turns_become_openai_messages_and_images_are_refused():
    conversation = messages_to_conversation([
        HumanMessage("1+2?"), AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1"}]),
        ToolMessage("3", tool_call_id="c1", name="add")])
    assert conversation[1]["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]
    assert conversation[2] == {"role": "tool", "tool_call_id": "c1", "content": "3", "name": "add"}
    with pytest.raises(RequestError, match="image_url"):
        messages_to_conversation([HumanMessage([{"type": "image_url", "image_url": {"url": "data:,"}}])])


# ----- generation ---------------------------------------------------------------------------------

def test_invoke_answers_with_usage_and_model_name(engine):
    chat = ChatVLLM(temperature=0, max_tokens=32)
    message = chat.invoke(FRANCE)
    assert isinstance(message, AIMessage) and "Paris" in message.content
    usage = message.usage_metadata
    assert usage["input_tokens"] == engine.last_result.prompt_tokens > 5
    assert usage["output_tokens"] == engine.last_result.output_tokens > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert message.response_metadata["model_name"] == DEMO_MODEL_NAME
    assert message.response_metadata["finish_reason"] == "stop"


def test_system_message_reaches_the_chat_template(engine):
    ChatVLLM(temperature=0, max_tokens=4).invoke([("system", "You answer in French."), ("human", FRANCE)])
    prompt = engine.last_result.prompt
    assert "<|im_start|>system\nYou answer in French." in prompt and FRANCE in prompt


def test_stream_yields_chunks_that_join_to_invoke(engine):
    chat = ChatVLLM(temperature=0, max_tokens=48)
    chunks = list(chat.stream("Tell me about Paris."))
    assert len(chunks) > 1 and all(isinstance(c, AIMessageChunk) for c in chunks)
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert full.content == chat.invoke("Tell me about Paris.").content
    assert sum(1 for c in chunks if c.usage_metadata) == 1  # counted once, on the last chunk
    assert full.usage_metadata["output_tokens"] == 48
    assert full.response_metadata["model_name"] == DEMO_MODEL_NAME
    assert chunks[-1].chunk_position == "last"


async def test_astream_and_ainvoke_agree(engine):
    chat = ChatVLLM(temperature=0, max_tokens=24)
    chunks = [c async for c in chat.astream(FRANCE)]
    assert "".join(c.content for c in chunks) == (await chat.ainvoke(FRANCE)).content


def test_chat_prompt_chain_sends_its_messages_and_returns_the_answer_text(engine):
    prompt = ChatPromptTemplate.from_messages([("system", "Answer in one sentence."), ("human", "{question}")])
    chain = prompt | ChatVLLM(temperature=0, max_tokens=32) | StrOutputParser()
    answer = chain.invoke({"question": FRANCE})
    assert isinstance(answer, str) and "Paris" in answer
    sent = engine.last_result.prompt
    assert "<|im_start|>system\nAnswer in one sentence." in sent and f"<|im_start|>user\n{FRANCE}" in sent
    assert answer == engine.last_result.text


def test_an_image_in_a_call_is_a_request_error_and_the_model_stays_usable(engine):
    chat = ChatVLLM(temperature=0, max_tokens=16)
    with pytest.raises(RequestError, match="image_url"):
        chat.invoke([HumanMessage([{"type": "image_url", "image_url": {"url": "data:,"}}])])
    assert "Paris" in chat.invoke(FRANCE).content


# ----- structured output ----------------------------------------------------------------------------

def test_structured_output_with_a_pydantic_model_returns_an_instance(engine):
    chat = ChatVLLM(temperature=0, max_tokens=128).with_structured_output(City)
    city = chat.invoke("Paris is the capital of France. Describe Paris.")
    assert isinstance(city, City) and city.name


def test_structured_output_batch_is_one_submission_and_every_answer_parses(engine):
    chat = ChatVLLM(temperature=0.9, seed=3, max_tokens=128).with_structured_output(City)
    before = engine.submissions
    cities = chat.batch([f"Describe a city you like, number {i}." for i in range(8)])
    assert engine.submissions == before + 1  # the bound schema travels with one batched submission
    assert len(cities) == 8 and all(isinstance(c, City) for c in cities)


def test_structured_output_with_a_json_schema_and_include_raw(engine):
    schema = {"title": "Answer", "type": "object",
              "properties": {"answer": {"type": "string"}, "confident": {"type": "boolean"}},
              "required": ["answer", "confident"]}
    chat = ChatVLLM(temperature=0, max_tokens=64).with_structured_output(schema, include_raw=True)
    out = chat.invoke(FRANCE)
    assert set(out) == {"raw", "parsed", "parsing_error"}
    assert isinstance(out["raw"], AIMessage) and out["parsing_error"] is None
    assert set(out["parsed"]) == {"answer", "confident"} and isinstance(out["parsed"]["confident"], bool)


def test_json_mode_without_a_schema_gives_an_object(engine):
    chat = ChatVLLM(temperature=0, max_tokens=64).with_structured_output(method="json_mode")
    assert isinstance(chat.invoke("Give the capital of France as JSON."), dict)


def test_structured_output_refuses_unknown_arguments(engine):
    with pytest.raises(ValueError):
        ChatVLLM().with_structured_output(City, tools=[])
    with pytest.raises(ValueError):
        ChatVLLM().with_structured_output(City, method="xml")


# ----- batches: one submission, callbacks per input, same answers as alone ---------------------
class RunRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.started: list[list] = []
        self.ended = 0

    def on_chat_model_start(self, serialized, messages, **kwargs) -> None:
        self.started.extend(messages)

    def on_llm_end(self, response, **kwargs) -> None:
        self.ended += 1


QUESTIONS = [f"What is {a} plus {b}?" for a in range(4) for b in range(8)]  # 32 inputs


def test_batch_is_one_submission_with_a_run_per_input_and_every_fifth_answer_as_alone(engine):
    chat = ChatVLLM(temperature=0, max_tokens=12)
    recorder = RunRecorder()
    before = engine.submissions
    answers = chat.batch(QUESTIONS, config={"callbacks": [recorder]})
    assert engine.submissions == before + 1
    assert len(recorder.started) == recorder.ended == len(QUESTIONS)  # callbacks per input
    for question, answer in zip(QUESTIONS[::5], answers[::5]):  # asking each alone is slow on a CPU
        assert isinstance(answer, AIMessage) and answer.usage_metadata["output_tokens"] > 0
        assert answer.content == chat.invoke(question).content


async def test_abatch_is_one_submission_with_a_run_per_input_and_every_fifth_answer_as_alone(engine):
    chat = ChatVLLM(temperature=0, max_tokens=12)
    recorder = RunRecorder()
    before = engine.submissions
    answers = await chat.abatch(QUESTIONS, config={"callbacks": [recorder]})
    assert engine.submissions == before + 1
    assert len(recorder.started) == recorder.ended == len(QUESTIONS)
    for question, answer in zip(QUESTIONS[::5], answers[::5]):
        assert answer.content == (await chat.ainvoke(question)).content


def test_batch_honours_stop(engine):
    chat = ChatVLLM(temperature=0, max_tokens=24)
    whole = chat.invoke(FRANCE).content
    assert "Paris" in whole and not whole.startswith("Paris"), whole  # greedy: a stop at "Paris" leaves text
    answers = chat.batch([FRANCE, FRANCE], stop=["Paris"])
    assert [a.content for a in answers] == [whole.split("Paris")[0]] * 2
    assert answers[0].content == chat.invoke(FRANCE, stop=["Paris"]).content


def test_stream_first_chunk_arrives_while_the_request_still_runs(engine):
    # 4000 tokens, ignoring EOS: the request cannot end by itself between the first chunk and the
    # close below, so an aborted result proves the chunk came while it ran (no timing involved).
    finished, ended = [], threading.Event()

    def record(result):
        finished.append(result)
        ended.set()

    engine.add_listener(record)
    try:
        served = engine.requests_served
        stream = ChatVLLM(temperature=0, max_tokens=4000, ignore_eos=True).stream("Tell me about Paris.")
        first = next(stream)
        assert first.content and first.usage_metadata is None
        assert engine.requests_served == served  # not held back until the request finished
        stream.close()
        assert ended.wait(120), "the request did not end"
    finally:
        engine.remove_listener(record)
    assert finished[0].aborted and 0 < finished[0].output_tokens < 4000


def test_stream_ends_with_a_chunk_of_usage_only(engine):
    chunks = list(ChatVLLM(temperature=0, max_tokens=16, ignore_eos=True).stream("Tell me about Paris."))
    assert chunks[0].usage_metadata is None and "".join(c.content for c in chunks).strip()
    assert chunks[-1].content == "" and chunks[-1].usage_metadata["output_tokens"] == 16
