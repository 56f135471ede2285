"""Tool calling on the engine: tools in the prompt, forced calls, and calls read back from text.

Tools are OpenAI-style dicts (``{"type": "function", "function": {"name", "description",
"parameters"}}``); a conversation carries calls as OpenAI messages do (an assistant message with
``tool_calls``, a ``{"role": "tool", "tool_call_id", "content"}`` message for each result).

* The model's chat template renders the tools (its ``tools=`` argument), the calls and the
  results, where it can. A template that ignores ``tools`` (the demo model's) gets the **textual
  fallback**: the tools go into the system message as JSON with the instruction to answer
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes format, which vLLM's
  ``hermes`` tool parser reads), earlier calls are written in that format, and results come back
  as user messages wrapped in ``<tool_response>`` tags. :func:`template_conversation` decides, by
  rendering a probe conversation once per engine.
* ``tool_choice`` "required" and a named tool constrain decoding to a JSON schema built from the
  tools (:func:`forced_schema`, the schema vLLM's OpenAI server uses), so even a small model
  answers with a valid call; :func:`parse_forced` reads it back.
* ``tool_choice`` "auto" lets the model choose; vLLM's tool parser (``--tool-call-parser NAME``)
  reads calls from the text (:class:`ToolCallParser`).

The same code runs for an engine in the kernel and for a ``--remote`` server: the parsing is done
here, on the generated text.
"""

from __future__ import annotations

import copy
import json
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from ...errors import ConfigError, RequestError
from .prompts import TokenPrompt, conversation_of

__all__ = ["ToolCall", "TemplateTools", "forced_schema", "parse_forced", "template_conversation",
           "fallback_conversation", "render_with_tools", "tool_name", "new_call_id", "ToolCallParser", "TOOL_PROMPT"]

#: What the textual fallback puts into the system message before the tools' JSON.
TOOL_PROMPT = (
    "You can call these tools. Each is described by a JSON schema inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call a tool, answer with a JSON object inside <tool_call></tool_call> tags, one per call:\n"
    '<tool_call>\n{{"name": "<tool name>", "arguments": {{<arguments>}}}}\n</tool_call>\n'
    "Tool results come back inside <tool_response></tool_response> tags.")


@dataclass
class ToolCall:
    """One call the model made: the tool's name, its arguments (a dict) and a call id."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: new_call_id())


def new_call_id() -> str:
    """A fresh call id, in the spelling OpenAI and vLLM use."""
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_name(tool: dict[str, Any]) -> str:
    return tool["function"]["name"]


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


# ----- forced calls: a JSON schema to decode with, and the answer read back ---------------------

def forced_schema(tools: list[dict[str, Any]], choice: str) -> dict[str, Any]:
    """The JSON schema that forces a call: for a tool's name, that tool's parameters; for
    ``"required"``, a list of ``{"name", "parameters"}`` objects, one of the tools each (as vLLM's
    OpenAI server builds it, shared ``$defs`` moved to the top)."""
    by_name = {tool_name(t): t for t in tools}
    if choice != "required":
        if choice not in by_name:
            raise RequestError(f"tool_choice names {choice!r}, but the tools are {', '.join(by_name) or 'none'}")
        return _parameters(by_name[choice])
    defs: dict[str, Any] = {}
    variants = []
    for tool in tools:
        parameters = copy.deepcopy(_parameters(tool))
        defs.update(parameters.pop("$defs", {}))
        variants.append({"properties": {"name": {"type": "string", "enum": [tool_name(tool)]},
                                        "parameters": parameters},
                         "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    if defs:
        schema["$defs"] = defs
    return schema


def parse_forced(text: str, choice: str) -> list[ToolCall]:
    """The calls in an answer decoded with :func:`forced_schema` (``choice`` as given there).

    Raises ``ValueError`` when the text is not such an answer (cut off by ``max_tokens``, say)."""
    value = json.loads(text)
    if choice != "required":
        if not isinstance(value, dict):
            raise ValueError(f"expected the arguments of {choice} as a JSON object, got {text[:80]!r}")
        return [ToolCall(choice, value)]
    if not isinstance(value, list):
        raise ValueError(f"expected a JSON list of tool calls, got {text[:80]!r}")
    calls = []
    for item in value:
        if not isinstance(item, dict) or "name" not in item:
            raise ValueError(f"not a tool call: {item!r}")
        arguments = item.get("parameters", item.get("arguments", {}))
        calls.append(ToolCall(str(item["name"]), arguments if isinstance(arguments, dict) else {}))
    return calls


# ----- the prompt: the template's own tool rendering, or the textual fallback ---------------------

@dataclass(frozen=True)
class TemplateTools:
    """What a chat template renders: the tools given to it, assistant tool calls, tool results."""

    tools: bool
    calls: bool
    results: bool

    #: The probe's markers: names no template produces by itself.
    _TOOL, _CALL, _RESULT = "probe_tool_zqx", "probe_call_zqx", "probe_result_zqx"

    @classmethod
    def probe(cls, render: Callable[[list[dict[str, Any]], list[dict[str, Any]]], str]) -> "TemplateTools":
        """Render one conversation with a tool, a call and a result, and see which of them show."""
        tools = [{"type": "function", "function": {"name": cls._TOOL, "description": "probe",
                                                    "parameters": {"type": "object", "properties": {}}}}]
        messages = [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"id": "call_0", "type": "function", "function": {"name": cls._CALL, "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "call_0", "name": cls._CALL, "content": cls._RESULT}]
        try:
            text = render(messages, tools)
        except Exception:  # noqa: BLE001 - a template that cannot take these has no tool support
            return cls(False, False, False)
        rendered_tools = cls._TOOL in text
        # A template that ignores the tools renders a "tool" role (if at all) as just another role
        # name the model never learnt: the textual fallback reads better to it.
        return cls(rendered_tools, rendered_tools and cls._CALL in text, rendered_tools and cls._RESULT in text)


_PROBED: "weakref.WeakKeyDictionary[Any, TemplateTools]" = weakref.WeakKeyDictionary()


def template_conversation(cache_key: Any, conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                          render: Callable[[list[dict[str, Any]], list[dict[str, Any]]], str]
                          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """``(messages, tools for the template)`` for one conversation: as given where the model's
    template renders tools, calls and results, else with the textual fallback for what it cannot.
    What the template renders is probed once per ``cache_key`` (a backend: one model, one template)."""
    has_tool_turns = any(m.get("tool_calls") or m.get("role") == "tool" for m in conversation)
    if not tools and not has_tool_turns:
        return conversation, None
    support = _PROBED.get(cache_key)
    if support is None:
        support = _PROBED[cache_key] = TemplateTools.probe(render)
    return fallback_conversation(conversation, tools or [], support), (tools or None) if support.tools else None


def fallback_conversation(conversation: list[dict[str, Any]], tools: list[dict[str, Any]],
                          support: TemplateTools) -> list[dict[str, Any]]:
    """The conversation with whatever the template cannot render written out as text."""
    messages = []
    for message in conversation:
        message = dict(message)
        if message.get("tool_calls") and not support.calls:
            calls = "\n".join(_call_text(c) for c in message.pop("tool_calls"))
            message["content"] = f"{message.get('content') or ''}\n{calls}".strip()
        elif message.get("role") == "tool" and not support.results:
            message = {"role": "user", "content": f"<tool_response>\n{message.get('content', '')}\n</tool_response>"}
        messages.append(message)
    if tools and not support.tools:
        described = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        prompt = TOOL_PROMPT.format(tools=described)
        if messages and messages[0].get("role") == "system":
            messages[0] = {**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{prompt}".strip()}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return _merge_user_turns(messages)


def _call_text(call: dict[str, Any]) -> str:
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return "<tool_call>\n" + json.dumps({"name": function.get("name"), "arguments": arguments},
                                         ensure_ascii=False) + "\n</tool_call>"


def _merge_user_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several tool results in a row become one user turn (templates expect turns to alternate)."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        if (merged and message.get("role") == "user" and merged[-1].get("role") == "user"
                and str(message.get("content", "")).startswith("<tool_response>")
                and str(merged[-1].get("content", "")).startswith("<tool_response>")):
            merged[-1] = {**merged[-1], "content": f"{merged[-1]['content']}\n{message['content']}"}
        else:
            merged.append(message)
    return merged


# ----- "auto": vLLM's tool parser over the answer ----------------------------------------------------

class ToolCallParser:
    """vLLM's tool parser ``name`` (``--tool-call-parser``) for one model's tokenizer.

    :meth:`extract` reads the calls out of a whole answer; the text around them is the content.
    """

    def __init__(self, name: str, tokenizer: Any) -> None:
        from ..compat import tool_parser_class

        cls = tool_parser_class(name)
        try:
            self._parser = cls(tokenizer)
        except Exception as exc:  # noqa: BLE001 - vLLM's parsers check the tokenizer's vocabulary
            raise ConfigError(f"vLLM's tool parser {name!r} does not work with this model: "
                              f"{' '.join(str(exc).split())[:200]}") from None
        self.name = name

    def extract(self, text: str, tools: list[dict[str, Any]]) -> tuple[str, list[ToolCall]]:
        """``(content, calls)`` of an answer; no calls when the model answered in text."""
        from ..compat import chat_request

        info = self._parser.extract_tool_calls(text, chat_request(tools))
        if not getattr(info, "tools_called", False):
            return text, []
        calls = []
        for call in info.tool_calls:
            try:
                arguments = json.loads(call.function.arguments or "{}")
            except ValueError:
                arguments = {}
            calls.append(ToolCall(call.function.name, arguments if isinstance(arguments, dict) else {},
                                  getattr(call, "id", None) or new_call_id()))
        return info.content or "", calls


# ----- rendering a batch ------------------------------------------------------------------------------

Render = Callable[[list[Any], bool, str, "dict[str, Any] | None"], list[Any]]


def render_with_tools(render: Render, items: list[Any], raw: bool, system: str, tools: list[dict[str, Any]] | None,
                      template_kwargs: dict[str, Any] | None, cache_key: Any) -> list[Any]:
    """``render(items, raw, system, template)`` (a backend's) for prompts that may carry tools, tool
    turns and template arguments: conversations are rewritten for what the model's template cannot
    render (probed once per ``cache_key``), and the tools go to the template where it takes them."""
    has_tool_turns = any(not isinstance(item, (str, TokenPrompt)) and any(
        m.get("tool_calls") or m.get("role") == "tool" for m in item) for item in items)
    if not tools and not template_kwargs and not has_tool_turns:
        return render(items, raw, system, None)
    kwargs = dict(template_kwargs or {})

    def probe(messages: list[dict[str, Any]], probe_tools: list[dict[str, Any]]) -> str:
        text = render([messages], False, "", {**kwargs, "tools": probe_tools})[0].text
        return text if isinstance(text, str) else text.result()  # a server renders it in a future

    converted: list[Any] = []
    template_tools = None
    for item in items:
        if isinstance(item, TokenPrompt) or (isinstance(item, str) and raw):
            converted.append(item)
            continue
        messages, template_tools = template_conversation(cache_key, conversation_of(item, system), tools, probe)
        converted.append(messages)
    template = {**kwargs, **({"tools": template_tools} if template_tools else {})}
    return render(converted, raw, system, template or None)
