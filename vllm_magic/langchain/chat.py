"""``ChatVLLM``: the session's engine as a LangChain chat model.

Messages become the conversation the session renders with the model's chat template; answers
stream as ``AIMessageChunk``s; ``with_structured_output`` constrains decoding with vLLM's
structured outputs (a JSON schema), so the answer always parses. ``bind_tools`` binds tools
(:mod:`.tools`); tool calls come back in ``AIMessage.tool_calls``, and AI messages with calls and
``ToolMessage``s go back to the model through its chat template. With a reasoning parser on the
session, the model's thinking is in ``additional_kwargs["reasoning_content"]``. Non-text content
(images, audio) is refused with a clear error.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from operator import itemgetter
from typing import Any, AsyncIterator, Iterator, Literal, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, ToolMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import get_config_list
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel

from ..engine.requests.handles import GenerationResult, RequestHandle
from ..engine.requests.logprobs import openai_chat_logprobs, visible_positions
from ..errors import RequestError
from .base import EngineBase, await_all, wait_all
from .tools import StreamReader, ToolRequest, openai_tools

__all__ = ["ChatVLLM", "messages_to_conversation", "usage_metadata"]

#: Handles submitted up front by ``generate``/``agenerate`` (one submission for a whole batch),
#: keyed by conversation; ``_submit`` takes them instead of submitting again.
_PREFETCHED: ContextVar[dict[str, list[RequestHandle]] | None] = ContextVar("_PREFETCHED", default=None)

#: ``generate`` arguments that are not sampling options.
_NOT_SAMPLING = ("tags", "metadata", "run_name", "run_id", "ls_structured_output_format", "structured_output_format")

#: The config keys a batch may share and still go through one ``generate`` call.
_SHARED_CONFIG_KEYS = ("callbacks", "tags", "metadata", "run_name")

_ROLES = {"system": "system", "human": "user", "user": "user", "ai": "assistant", "assistant": "assistant"}


class ChatVLLM(EngineBase, BaseChatModel):
    """The session's vLLM engine as a LangChain chat model.

    Engine fields are those of ``VLLM``; sampling fields (``temperature``, ``max_tokens`` alias
    ``max_new_tokens``, ``stop``, ``n``, ...) left unset follow the session's defaults.

    >>> from vllm_magic.langchain import ChatVLLM
    >>> chat = ChatVLLM(temperature=0)  # the demo model, or the live engine's  # doctest: +SKIP
    >>> chat.invoke([("system", "Answer briefly."), ("human", "Capital of France?")])  # doctest: +SKIP
    """

    streaming: bool = False
    """Whether ``invoke`` streams internally (callbacks see every token)."""
    logprobs: bool | None = None  # type: ignore[assignment]
    """Whether to return the answer's logprobs in ``response_metadata["logprobs"]`` (OpenAI's shape,
    as ``ChatOpenAI``); ``top_logprobs`` alternatives per token."""
    top_logprobs: int | None = None
    """How many most likely alternatives per token ``logprobs=True`` returns (0 when unset)."""

    @property
    def _default_params(self) -> dict[str, Any]:
        params = super()._default_params
        return _sampling_logprobs(params, params.pop("logprobs", None), self.top_logprobs)

    def _submit(self, prompts: list[Any], stop: list[str] | None, kwargs: dict[str, Any], *, stream: bool,
                **options: Any) -> list[RequestHandle]:
        kwargs = dict(kwargs)
        if "logprobs" in kwargs or "top_logprobs" in kwargs:  # a call's logprobs=True, top_logprobs=K
            wanted = kwargs.pop("logprobs", self.logprobs)
            top = kwargs.pop("top_logprobs", self.top_logprobs)
            kwargs.update(_sampling_logprobs({}, wanted, top) or {"logprobs": None})
        return super()._submit(prompts, stop, kwargs, stream=stream, **options)

    @property
    def _llm_type(self) -> str:
        return "vllm-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="vllm", ls_model_name=kwargs.get("model") or self.model_name,
                                 ls_model_type="chat")
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = float(temperature)
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = int(max_tokens)
        stop = stop or kwargs.get("stop") or self.stop
        if stop:
            params["ls_stop"] = list(stop)
        return params

    # ----- shared by the sync and async paths ----------------------------------------------------
    def _submit_messages(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any],
                         stream: bool) -> tuple[RequestHandle, ToolRequest | None]:
        """Submit one conversation (or take its prefetched request); also returns the call's tools.
        ``stream``: whether the caller reads the answer as it grows."""
        conversation = messages_to_conversation(messages)
        kwargs, tools = self._tool_request(kwargs)
        prefetched = _PREFETCHED.get()
        if prefetched and prefetched.get(self._key(conversation)):
            return prefetched[self._key(conversation)].pop(0), tools
        options = tools.submit_options() if tools else {}
        return self._submit([conversation], stop, kwargs, stream=stream, **options)[0], tools

    def _tool_request(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], ToolRequest | None]:
        """The call's arguments without ``raw`` (a conversation always goes through the chat
        template) and without its tools, and the tools as a :class:`ToolRequest`."""
        kwargs = _without_raw(kwargs)
        return kwargs, ToolRequest.from_call(kwargs, self._live_session())

    def _key(self, conversation: list[dict[str, str]]) -> str:
        # The object is part of the key: a model called from a callback must not take this batch's requests.
        return f"{id(self)}:{json.dumps(conversation, sort_keys=True)}"

    def _prefetch(self, messages: list[list[BaseMessage]], stop: list[str] | None,
                  kwargs: dict[str, Any]) -> dict[str, list[RequestHandle]]:
        """Submit every conversation of a batch at once, so the engine schedules them together."""
        conversations = [messages_to_conversation(m) for m in messages]
        kwargs, tools = self._tool_request(kwargs)
        # LangChain's generate streams each input only when streaming is on (or a callback asks)
        handles = self._submit(conversations, stop, kwargs, stream=self.streaming,
                               **(tools.submit_options() if tools else {}))
        prefetched: dict[str, list[RequestHandle]] = {}
        for conversation, handle in zip(conversations, handles):
            prefetched.setdefault(self._key(conversation), []).append(handle)
        return prefetched

    @contextmanager
    def _submitted_together(self, messages: list[list[BaseMessage]] | None, stop: list[str] | None,
                            kwargs: dict[str, Any]) -> Iterator[None]:
        """Within the block, calls for these conversations take requests submitted up front in one
        call. If that submission cannot be made (a message the model refuses, a prompt too long),
        nothing is prefetched and each call reports its own error."""
        prefetched = None
        if messages is not None and len(messages) > 1:
            try:
                prefetched = self._prefetch(messages, stop, {k: v for k, v in kwargs.items() if k not in _NOT_SAMPLING})
            except Exception:
                prefetched = None
        if prefetched is None:
            yield
            return
        token = _PREFETCHED.set(prefetched)
        try:
            yield
        finally:
            _PREFETCHED.reset(token)
            _abort_unused(prefetched)

    # ----- batches: one submission for all inputs ------------------------------------------------
    def generate(self, messages: list[list[BaseMessage]], stop: list[str] | None = None,
                 callbacks: Any = None, **kwargs: Any) -> LLMResult:
        """``BaseChatModel.generate`` (callbacks per input, caching), with all conversations
        submitted to the engine in one call instead of one by one."""
        with self._submitted_together(messages, stop, kwargs):
            return super().generate(messages, stop, callbacks, **kwargs)

    async def agenerate(self, messages: list[list[BaseMessage]], stop: list[str] | None = None,
                        callbacks: Any = None, **kwargs: Any) -> LLMResult:
        """The async ``generate``: all conversations in one submission."""
        with self._submitted_together(messages, stop, kwargs):
            return await super().agenerate(messages, stop, callbacks, **kwargs)

    def _messages_or_none(self, inputs: list[LanguageModelInput]) -> list[list[BaseMessage]] | None:
        try:
            return [self._convert_input(i).to_messages() for i in inputs]
        except Exception:  # reported by the input's own call
            return None

    def _batch_call(self, inputs: list[LanguageModelInput], config: RunnableConfig | list[RunnableConfig] | None,
                    return_exceptions: bool, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The ``generate`` arguments for a batch, or None when it must go input by input
        (per-input configs, run ids, or exceptions returned instead of raised)."""
        configs = get_config_list(config, len(inputs))
        first = configs[0]
        if (return_exceptions or len(inputs) < 2 or any(c.get("run_id") for c in configs)
                or any(c.get(k) != first.get(k) for c in configs for k in _SHARED_CONFIG_KEYS)):
            return None
        return {"messages": [self._convert_input(i).to_messages() for i in inputs],
                "callbacks": first.get("callbacks"), "tags": first.get("tags"),
                "metadata": first.get("metadata"), "run_name": first.get("run_name"), **kwargs}

    def batch(self, inputs: list[LanguageModelInput], config: RunnableConfig | list[RunnableConfig] | None = None,
              *, return_exceptions: bool = False, **kwargs: Any) -> list[BaseMessage]:
        """Answers to all inputs, submitted to the engine together."""
        call = self._batch_call(inputs, config, return_exceptions, kwargs)
        if call is None:  # per-input configs: LangChain's batch, over requests submitted together
            with self._submitted_together(self._messages_or_none(inputs), kwargs.get("stop"), kwargs):
                return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        return [g[0].message for g in self.generate(**call).generations]

    async def abatch(self, inputs: list[LanguageModelInput],
                     config: RunnableConfig | list[RunnableConfig] | None = None,
                     *, return_exceptions: bool = False, **kwargs: Any) -> list[BaseMessage]:
        """Async answers to all inputs, submitted to the engine together."""
        call = self._batch_call(inputs, config, return_exceptions, kwargs)
        if call is None:
            with self._submitted_together(self._messages_or_none(inputs), kwargs.get("stop"), kwargs):
                return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        return [g[0].message for g in (await self.agenerate(**call)).generations]

    def _chat_result(self, result: GenerationResult, tools: ToolRequest | None) -> ChatResult:
        usage = usage_metadata(result)
        generations = []
        for c in result.completions:
            content, calls, invalid = tools.read(c.text) if tools is not None else (c.text, [], [])
            metadata = {"model_name": self.model_name, "finish_reason": c.finish_reason}
            if c.logprobs is not None:
                metadata["logprobs"] = openai_chat_logprobs(visible_positions(c.logprobs, c.text, c.finish_reason))
            message = AIMessage(content=content, tool_calls=calls, invalid_tool_calls=invalid,
                                additional_kwargs={"reasoning_content": c.reasoning} if c.reasoning else {},
                                usage_metadata=usage if c.index == 0 else None, response_metadata=metadata)
            generations.append(ChatGeneration(message=message, generation_info={"finish_reason": c.finish_reason}))
        return ChatResult(generations=generations, llm_output={
            "model_name": self.model_name, "token_usage": {
                "prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"],
                "total_tokens": usage["total_tokens"]}})

    def _chunk(self, text: str, handle: RequestHandle, last: bool) -> ChatGenerationChunk:
        """One streamed delta; the last one carries usage, finish reason and the model name (only
        once, because chunks are added together)."""
        if not last:
            return ChatGenerationChunk(message=AIMessageChunk(content=text))
        result = handle.snapshot()
        metadata = {"model_name": self.model_name, "finish_reason": result.finish_reason}
        if result.logprobs is not None:  # the whole answer's, once: chunks are added together
            metadata["logprobs"] = openai_chat_logprobs(visible_positions(result.logprobs, result.text,
                                                                          result.finish_reason))
        message = AIMessageChunk(content=text, usage_metadata=usage_metadata(result), chunk_position="last",
                                 response_metadata=metadata)
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": result.finish_reason})

    def _delta_chunks(self, text: str, reasoning: bool, handle: RequestHandle,
                      reader: StreamReader | None) -> list[ChatGenerationChunk]:
        if reasoning:  # the model's thinking, streamed as it arrives
            return [ChatGenerationChunk(message=AIMessageChunk(content="", additional_kwargs={"reasoning_content": text}))]
        if reader is None:
            return [self._chunk(text, handle, last=False)]
        content, calls = reader.feed(text)
        return [ChatGenerationChunk(message=AIMessageChunk(content=content, tool_call_chunks=calls))] \
            if content or calls else []

    def _last_chunks(self, handle: RequestHandle, reader: StreamReader | None) -> list[ChatGenerationChunk]:
        chunks = []
        if reader is not None:
            content, calls = reader.finish()
            if content or calls:
                chunks.append(ChatGenerationChunk(message=AIMessageChunk(content=content, tool_call_chunks=calls)))
        return chunks + [self._chunk("", handle, last=True)]

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        handle, tools = self._submit_messages(messages, stop, kwargs, stream=False)
        return self._chat_result(wait_all([handle], self.timeout)[0], tools)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        handle, tools = self._submit_messages(messages, stop, kwargs, stream=True)
        yield from self._stream_handle(handle, run_manager, tools.stream_reader() if tools else None)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        handle, tools = self._submit_messages(messages, stop, kwargs, stream=False)
        return self._chat_result((await await_all([handle], self.timeout))[0], tools)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        handle, tools = self._submit_messages(messages, stop, kwargs, stream=True)
        async for chunk in self._astream_handle(handle, run_manager, tools.stream_reader() if tools else None):
            yield chunk

    # ----- tools ----------------------------------------------------------------------------------
    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """A runnable whose calls offer ``tools`` (LangChain tools, pydantic classes, functions or
        OpenAI tool dicts) to the model.

        The tools reach the model through its chat template (``tools=``). A template that ignores
        them (the demo model's) gets them in the system message instead, as JSON, with the
        instruction to answer ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes
        format); earlier calls and ``ToolMessage`` results are written the same way.

        ``tool_choice``:

        * ``"any"``, ``"required"`` or ``True``: the model must call a tool; a tool's name (or
          ``{"type": "function", "function": {"name": ...}}``): it must call that one. Decoding is
          constrained to the tools' JSON schemas with vLLM's structured outputs, as vLLM's own
          server does, so the call always parses and its arguments follow the schema (even from a
          135M model). With one tool, "any" names it.
        * ``"auto"`` (or None): the model decides. Its calls are read by vLLM's tool parser of the
          session: load with ``%vllm_load MODEL --tool-call-parser NAME`` (``hermes`` reads the
          format above; ``session.parsers`` from Python). Without a parser the answer stays text.
          With a parser, a streamed answer arrives whole at its end (the parser reads complete text).
        * ``"none"``: the tools are shown, no call is made or read.
        """
        return self.bind(tools=openai_tools(tools), tool_choice=tool_choice, **kwargs)

    # ----- structured output --------------------------------------------------------------------
    def with_structured_output(
        self, schema: dict[str, Any] | type | None = None, *,
        method: Literal["json_schema", "json_mode", "function_calling"] = "json_schema",
        include_raw: bool = False, strict: bool | None = None, **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """A runnable whose answers follow ``schema`` (a pydantic class, a TypedDict, or a JSON schema).

        Decoding is constrained by vLLM's structured outputs, so the answer always parses (unless it
        is cut off by ``max_tokens``). A pydantic class gives instances, anything else dicts.
        ``json_schema`` and ``json_mode`` constrain the answer's text (``json_mode`` without a schema
        asks for any JSON object); ``function_calling`` binds the schema as a tool and forces a call
        to it (``bind_tools(..., tool_choice=name)``), reading the call's arguments. ``strict`` is accepted for compatibility: the output is
        always held to the schema. ``include_raw=True`` returns ``{"raw", "parsed", "parsing_error"}``.
        """
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        if method not in ("json_schema", "json_mode", "function_calling"):
            raise ValueError(f"method must be 'json_schema', 'json_mode' or 'function_calling', not {method!r}")
        if schema is None and method != "json_mode":
            raise ValueError(f"schema must be given for method={method!r}")
        json_schema = structured_output_schema(schema)
        output_format = {"kwargs": {"method": method, "strict": strict},
                         "schema": schema if schema is not None else json_schema}
        if method == "function_calling":
            tool = openai_tools([schema])[0]
            name = tool["function"]["name"]
            bound = self.bind_tools([tool], tool_choice=name, ls_structured_output_format=output_format)
            if isinstance(schema, type) and is_basemodel_subclass(schema):
                parser: Runnable = PydanticToolsParser(tools=[schema], first_tool_only=True)
            else:
                parser = JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            return _with_raw(bound, parser) if include_raw else bound | parser
        bound = self.bind(json_schema=json_schema, ls_structured_output_format=output_format)
        if isinstance(schema, type) and is_basemodel_subclass(schema):
            parser: Runnable = PydanticOutputParser(pydantic_object=schema)
        else:
            parser = JsonOutputParser()
        return _with_raw(bound, parser) if include_raw else bound | parser


def _sampling_logprobs(params: dict[str, Any], wanted: Any, top: int | None) -> dict[str, Any]:
    """ChatOpenAI's ``logprobs=True, top_logprobs=K`` as the engine's ``logprobs=K`` (an int given
    as ``logprobs`` is taken as K, as ``VLLM`` takes it)."""
    if wanted is None or wanted is False:
        return params
    k = top if top is not None else (0 if wanted is True else int(wanted))
    return {**params, "logprobs": k}


def _with_raw(bound: Runnable, parser: Runnable) -> Runnable:
    """``{"raw", "parsed", "parsing_error"}``: the message, its parsed value, and why parsing failed."""
    parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    fallback = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=bound) | parse.with_fallbacks([fallback], exception_key="parsing_error")


def structured_output_schema(schema: dict[str, Any] | type | None) -> dict[str, Any]:
    """The JSON schema vLLM constrains decoding with, for a pydantic class, TypedDict or schema dict."""
    if schema is None:
        return {"type": "object"}
    if isinstance(schema, dict) and ("properties" in schema or "type" in schema or "$defs" in schema):
        return schema  # already a JSON schema: keep it exactly (refs and all)
    if isinstance(schema, type) and is_basemodel_subclass(schema) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema()
    return convert_to_json_schema(schema)


def _without_raw(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A conversation always goes through the chat template: ``raw`` has no meaning here."""
    return {k: v for k, v in kwargs.items() if k != "raw"}


def _abort_unused(prefetched: dict[str, list[RequestHandle]]) -> None:
    """Free the engine of prefetched requests nobody took (answered from a cache, or streamed)."""
    for handles in prefetched.values():
        for handle in handles:
            handle.abort()


def messages_to_conversation(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> the ``{"role", "content"}`` dicts the session's chat template takes.

    System, human, AI and tool messages (and ``ChatMessage`` with one of those roles) are
    supported; an AI message's ``tool_calls`` and a ``ToolMessage`` become OpenAI's ``tool_calls``
    and ``{"role": "tool", "tool_call_id"}`` message. The sender ``name`` is not part of the
    template and is dropped. Non-text content raises :class:`~vllm_magic.errors.RequestError`.
    """
    conversation: list[dict[str, Any]] = []
    for message in messages:
        role = message.role if isinstance(message, ChatMessage) else message.type
        if isinstance(message, ToolMessage):
            conversation.append({"role": "tool", "tool_call_id": message.tool_call_id, "content": _text_of(message),
                                 **({"name": message.name} if message.name else {})})
            continue
        if role not in _ROLES:
            raise RequestError(f"ChatVLLM does not support {type(message).__name__} ({role!r} messages); "
                               "use system, human, AI and tool messages")
        turn: dict[str, Any] = {"role": _ROLES[role], "content": _text_of(message)}
        if isinstance(message, AIMessage) and message.tool_calls:
            turn["tool_calls"] = [{"id": c.get("id") or f"call_{i}", "type": "function", "function": {
                "name": c["name"], "arguments": json.dumps(c["args"], ensure_ascii=False)}}
                for i, c in enumerate(message.tool_calls)]
        conversation.append(turn)
    if not conversation:
        raise RequestError("ChatVLLM needs at least one message")
    return conversation


def _text_of(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif isinstance(block, dict) and block.get("type") in ("thinking", "reasoning"):
            continue  # another model's reasoning is not part of this conversation
        elif isinstance(block, dict) and block.get("type") in ("tool_use", "tool_call", "function_call"):
            continue  # the message's tool_calls carry the calls
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise RequestError(f"ChatVLLM supports text content only, not {kind!r} blocks")
    return "".join(parts)


def usage_metadata(result: GenerationResult) -> UsageMetadata:
    """LangChain's ``usage_metadata`` for a finished request."""
    return UsageMetadata(input_tokens=result.prompt_tokens, output_tokens=result.output_tokens,
                         total_tokens=result.prompt_tokens + result.output_tokens)

