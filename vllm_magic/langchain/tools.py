"""Tool calling for ``ChatVLLM``: tools and ``tool_choice`` in, ``tool_calls`` out.

:class:`ToolRequest` is what ``bind_tools`` bound, turned into a request for the session (tools for
the chat template, a JSON schema that forces a call) and a reader of the answer: whole
(:meth:`ToolRequest.read`) or streamed (:class:`StreamReader`, ``tool_call_chunks``). The engine
side (rendering, forced schemas, vLLM's tool parsers) is :mod:`vllm_magic.engine.requests.tool_calls`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from langchain_core.messages.tool import InvalidToolCall, ToolCall, ToolCallChunk
from langchain_core.utils.function_calling import convert_to_openai_tool

from ..engine.requests.tool_calls import ToolCallParser, forced_schema, new_call_id, parse_forced, tool_name
from ..errors import RequestError

__all__ = ["ToolRequest", "StreamReader", "openai_tools", "tool_choice_name"]

#: ``tool_choice`` values that force some call (LangChain says "any", OpenAI "required").
_FORCING = ("any", "required", True)


def openai_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """LangChain tools, pydantic classes, functions or dicts as OpenAI tool dicts."""
    return [convert_to_openai_tool(t) for t in tools]


def tool_choice_name(tool_choice: Any, tools: list[dict[str, Any]]) -> str:
    """``"auto"``, ``"none"``, ``"required"`` or a tool's name, from any spelling LangChain and
    OpenAI use: ``"any"``/``True``, a name, ``{"type": "function", "function": {"name": ...}}``."""
    names = [tool_name(t) for t in tools]
    if tool_choice in (None, "auto", False):
        return "auto"
    if tool_choice == "none":
        return "none"
    if tool_choice in _FORCING:
        # One tool: forcing it is naming it (its arguments alone are decoded, which a small model
        # gets right more often than a list of calls).
        return names[0] if len(names) == 1 else "required"
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    else:
        name = tool_choice
    if not isinstance(name, str) or name not in names:
        raise RequestError(f"tool_choice {tool_choice!r} is not one of the bound tools ({', '.join(names) or 'none'})"
                           "; use 'auto', 'any', 'required', 'none' or a tool's name")
    return name


@dataclass
class ToolRequest:
    """Tools bound to a call and how the model must use them.

    ``choice``: ``"auto"`` (the model decides; vLLM's tool parser ``parser`` reads calls from the
    text, and without one the answer is text), ``"none"`` (no call), ``"required"`` (at least one
    call, decoding constrained) or a tool's name (that call, decoding constrained).
    """

    tools: list[dict[str, Any]]
    choice: str = "auto"
    parser: ToolCallParser | None = None

    @classmethod
    def from_call(cls, kwargs: dict[str, Any], session: Any) -> "ToolRequest | None":
        """Take ``tools`` and ``tool_choice`` out of a call's arguments (None without tools)."""
        tools = kwargs.pop("tools", None)
        tool_choice = kwargs.pop("tool_choice", None)
        kwargs.pop("parallel_tool_calls", None)
        if not tools:
            if tool_choice not in (None, "auto", "none"):
                raise RequestError(f"tool_choice={tool_choice!r} needs tools: bind them with bind_tools(...)")
            return None
        tools = openai_tools(tools)
        choice = tool_choice_name(tool_choice, tools)
        parser = None
        name = session.parsers.tool_call
        if choice == "auto" and name:
            parser = ToolCallParser(name, session.tokenizer)
        return cls(tools, choice, parser)

    @property
    def forced(self) -> bool:
        return self.choice not in ("auto", "none")

    def submit_options(self) -> dict[str, Any]:
        """What ``session.submit`` takes for it: the tools, and the schema of a forced call."""
        options: dict[str, Any] = {"tools": self.tools}
        if self.forced:
            options["json_schema"] = forced_schema(self.tools, self.choice)
        return options

    def read(self, text: str) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
        """``(content, tool_calls, invalid_tool_calls)`` of a whole answer."""
        if self.forced:
            try:
                calls = parse_forced(text, self.choice)
            except ValueError as exc:  # cut off by max_tokens, or interrupted
                return "", [], [InvalidToolCall(type="invalid_tool_call", name=None if self.choice == "required"
                                                else self.choice, args=text, id=new_call_id(), error=str(exc))]
            return "", [ToolCall(name=c.name, args=c.arguments, id=c.id, type="tool_call") for c in calls], []
        if self.choice == "auto" and self.parser is not None:
            content, calls = self.parser.extract(text, self.tools)
            return content, [ToolCall(name=c.name, args=c.arguments, id=c.id, type="tool_call") for c in calls], []
        return text, [], []

    def stream_reader(self) -> "StreamReader":
        return StreamReader(self)


@dataclass
class StreamReader:
    """Turns one request's streamed text into content deltas and ``tool_call_chunks``.

    A named tool streams its arguments as they are generated; a ``"required"`` list of calls and
    calls read by vLLM's parser come as whole chunks once the answer is complete (added together,
    the chunks give the same calls as :meth:`ToolRequest.read`).
    """

    request: ToolRequest
    text: str = ""
    _call_id: str = field(default_factory=new_call_id)

    def feed(self, delta: str) -> tuple[str, list[ToolCallChunk]]:
        """``(content delta, tool call chunks)`` of one text delta."""
        request = self.request
        first = not self.text
        self.text += delta
        if request.forced and request.choice != "required":
            return "", [ToolCallChunk(name=request.choice if first else None, args=delta,
                                      id=self._call_id if first else None, index=0, type="tool_call_chunk")]
        if request.forced or (request.choice == "auto" and request.parser is not None):
            return "", []  # read once complete
        return delta, []

    def finish(self) -> tuple[str, list[ToolCallChunk]]:
        """What is left once the answer is complete."""
        request = self.request
        if not request.forced and request.parser is None:
            return "", []
        if request.forced and request.choice != "required":
            if not self.text:  # nothing was streamed: the (invalid) call still gets its name
                return "", [ToolCallChunk(name=request.choice, args="", id=self._call_id, index=0,
                                          type="tool_call_chunk")]
            return "", []
        content, calls, invalid = request.read(self.text)
        chunks = [ToolCallChunk(name=c["name"], args=json.dumps(c["args"], ensure_ascii=False), id=c["id"],
                                index=i, type="tool_call_chunk") for i, c in enumerate(calls)]
        chunks += [ToolCallChunk(name=c.get("name"), args=c.get("args"), id=c.get("id"), index=len(chunks) + i,
                                 type="tool_call_chunk") for i, c in enumerate(invalid)]
        return content, chunks
