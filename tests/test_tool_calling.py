"""Tool calling with ``ChatVLLM`` on the real demo-model engine: forced calls decoded against the
tools' schemas, streamed as ``tool_call_chunks``, tool results sent back, and ``"auto"``."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from vllm_magic.engine.config import Parsers
from vllm_magic.engine.requests.tool_calls import TemplateTools, fallback_conversation, forced_schema, parse_forced
from vllm_magic.errors import RequestError
from vllm_magic.langchain import ChatVLLM
from vllm_magic.langchain.tools import openai_tools, tool_choice_name


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny and 24 C in {city}."


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


TOOLS = [get_weather, add]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in openai_tools(TOOLS)}


class City(BaseModel):
    """A city."""

    name: str = Field(description="the city's name")


def assert_valid_calls(message: AIMessage, name: str | None = None) -> None:
    assert isinstance(message, AIMessage) and message.tool_calls, message
    for call in message.tool_calls:
        assert call["id"] and call["type"] == "tool_call"
        assert name is None or call["name"] == name
        jsonschema.validate(call["args"], SCHEMAS[call["name"]])


@pytest.fixture
def chat(engine):
    return ChatVLLM(temperature=0, max_tokens=96)


# ----- pure logic ---------------------------------------------------------------------------------

def test_tool_choice_spellings_name_one_mode():
    tools = openai_tools(TOOLS)
    assert tool_choice_name(None, tools) == "auto"
    assert tool_choice_name("any", tools) == tool_choice_name(True, tools) == "required"
    assert tool_choice_name("any", tools[:1]) == "get_weather"  # one tool: forcing it names it
    assert tool_choice_name({"type": "function", "function": {"name": "add"}}, tools) == "add"
    with pytest.raises(RequestError, match="not one of the bound tools"):
        tool_choice_name("nope", tools)


def test_forced_answers_read_back_into_calls():
    tools = openai_tools(TOOLS)
    assert forced_schema(tools, "add") == SCHEMAS["add"]
    schema = forced_schema(tools, "required")
    text = '[{"name": "add", "parameters": {"a": 1, "b": 2}}]'
    jsonschema.validate(json.loads(text), schema)
    [call] = parse_forced(text, "required")
    assert (call.name, call.arguments) == ("add", {"a": 1, "b": 2}) and call.id.startswith("call_")
    with pytest.raises(ValueError):
        parse_forced('{"a": 1', "add")


def test_a_template_without_tools_gets_them_as_text():
    conversation = [{"role": "user", "content": "1+2?"},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    messages = fallback_conversation(conversation, openai_tools(TOOLS), TemplateTools(False, False, False))
    assert messages[0]["role"] == "system" and '"name": "get_weather"' in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'}
    assert messages[3] == {"role": "user", "content": "<tool_response>\n3\n</tool_response>"}


# ----- on the engine ------------------------------------------------------------------------------

def test_the_demo_template_ignores_tools_so_they_reach_the_prompt_as_text(chat, engine):
    chat.bind_tools(TOOLS, tool_choice="get_weather").invoke("Weather in Paris?")
    prompt = engine.last_result.prompt
    assert prompt.startswith("<|im_start|>system\nYou can call these tools.") and '"name": "add"' in prompt


@pytest.mark.parametrize("choice", ["any", "required"])
def test_a_required_call_parses_into_tool_calls_valid_against_the_schema(chat, choice):
    assert_valid_calls(chat.bind_tools(TOOLS, tool_choice=choice).invoke("What is 2 plus 3?"))


def test_a_named_tool_is_called_for_invoke_stream_and_ainvoke(chat):
    bound = chat.bind_tools(TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    invoked = bound.invoke("What is the weather in Paris?")
    assert_valid_calls(invoked, "get_weather")
    chunks = list(bound.stream("What is the weather in Paris?"))
    assert sum(1 for c in chunks if c.tool_call_chunks) > 1  # the arguments stream as they are generated
    streamed = chunks[0]
    for chunk in chunks[1:]:
        streamed += chunk
    assert_valid_calls(streamed, "get_weather")
    assert streamed.tool_calls[0]["args"] == invoked.tool_calls[0]["args"]
    awaited = asyncio.run(bound.ainvoke("What is the weather in Paris?"))
    assert awaited.tool_calls[0]["args"] == invoked.tool_calls[0]["args"]


def test_a_required_call_streams_into_the_same_call(chat):
    bound = chat.bind_tools(TOOLS, tool_choice="required")
    invoked = bound.invoke("What is 2 plus 3?")
    streamed = None
    for chunk in bound.stream("What is 2 plus 3?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert_valid_calls(streamed)
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(c["name"], c["args"]) for c in invoked.tool_calls]


def test_a_tool_result_goes_back_and_the_model_answers_in_text(chat, engine):
    question = HumanMessage("What is the weather in Paris?")
    call = chat.bind_tools([get_weather], tool_choice="any").invoke([question])
    result = get_weather.invoke(call.tool_calls[0])
    answer = chat.bind_tools([get_weather]).invoke([question, call, result])
    assert isinstance(answer, AIMessage) and answer.content and not answer.tool_calls
    prompt = engine.last_result.prompt
    args = json.dumps(call.tool_calls[0]["args"])
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call>' in prompt
    assert f"<|im_start|>user\n<tool_response>\n{result.content}\n</tool_response>" in prompt


def test_auto_without_a_parser_answers_in_text(chat, engine):
    engine.parsers = Parsers()
    message = chat.bind_tools(TOOLS).invoke("Say hello.")
    assert message.content and message.tool_calls == []


def test_auto_with_the_hermes_parser_reads_calls_out_of_the_text(chat, engine):
    engine.parsers = Parsers(tool_call="hermes")
    try:
        # A regex makes the 135M model answer in the format the textual fallback asks for.
        call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        message = chat.bind_tools(TOOLS).invoke("Weather in Paris?", regex=call.replace("{", r"\{").replace("}", r"\}"))
        assert message.tool_calls[0]["name"] == "get_weather" and message.tool_calls[0]["args"] == {"city": "Paris"}
        assert message.content == ""
        streamed = None
        for chunk in chat.bind_tools(TOOLS).stream("Weather in Paris?", regex=call.replace("{", r"\{").replace("}", r"\}")):
            streamed = chunk if streamed is None else streamed + chunk
        assert streamed.tool_calls[0]["args"] == {"city": "Paris"}
    finally:
        engine.parsers = Parsers()


def test_structured_output_by_function_calling_with_and_without_raw(chat):
    city = chat.with_structured_output(City, method="function_calling").invoke("Name a city in France.")
    assert isinstance(city, City) and city.name
    raw = chat.with_structured_output(City, method="function_calling", include_raw=True).invoke("Name a city.")
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], City)
    assert raw["raw"].tool_calls[0]["name"] == "City"
