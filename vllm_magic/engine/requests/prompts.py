"""From what a caller passes to what an engine runs: conversations, chat templates, token ids, and
the room left in the context window.

A prompt is a string (one user message, or plain completion text when ``raw``) or a conversation (a
list of ``{"role", "content"}`` dicts). :class:`PromptRenderer` renders a whole batch with one
template call and one tokenizer call where the tokenizer takes batches; the results are identical
to rendering and encoding them one by one.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Sequence

from ...errors import PromptTooLongError, RequestError

__all__ = ["Message", "PromptLike", "Prepared", "PromptRenderer", "TokenPrompt", "as_prompt_list",
           "conversation_of", "template_messages", "token_prompt_of"]

Message = dict[str, str]


@dataclass(frozen=True)
class TokenPrompt:
    """A prompt given as token ids, sent as they are: no chat template, no tokenizer (a branch of
    an answer continues from exactly its tokens). vLLM's ``{"prompt_token_ids": [...]}`` dict is
    taken as one too."""

    token_ids: tuple[int, ...]

    def __init__(self, token_ids: Sequence[int]) -> None:
        ids = tuple(int(t) for t in token_ids)
        if not ids:
            raise RequestError("a token prompt needs at least one token id")
        object.__setattr__(self, "token_ids", ids)


PromptLike = str | Sequence[Message] | TokenPrompt


def token_prompt_of(item: Any) -> TokenPrompt | None:
    """``item`` as a :class:`TokenPrompt` when it is one (or vLLM's ``prompt_token_ids`` dict), else None."""
    if isinstance(item, TokenPrompt):
        return item
    if isinstance(item, dict) and "prompt_token_ids" in item:
        return TokenPrompt(item["prompt_token_ids"])
    return None


@dataclass(frozen=True)
class Prepared:
    """One prompt as the engine gets it: the text after the chat template, and its token ids.

    ``text`` may be a ``concurrent.futures.Future`` of it where a server renders it while the
    request already runs (it is only shown, never sent).
    """

    text: Any
    token_ids: list[int]


def as_prompt_list(prompts: Any) -> list[PromptLike]:
    """One prompt, one conversation, or a list of either -> a list of prompts."""
    single = token_prompt_of(prompts)
    if single is not None:
        return [single]
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], dict) and token_prompt_of(prompts[0]) is None:
        return [prompts]  # one conversation
    prompts = [token_prompt_of(p) or p for p in prompts]
    if not prompts:
        raise RequestError("no prompts given")
    return prompts


def conversation_of(item: PromptLike, system: str) -> list[Message]:
    """The messages of a prompt: a string is one user turn; ``system`` goes first unless one is there."""
    messages = [{"role": "user", "content": item}] if isinstance(item, str) else [dict(m) for m in item]
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def template_messages(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as Hugging Face chat templates take them: call arguments as dicts, not JSON text
    (vLLM's server does the same before it applies a template)."""
    messages = []
    for message in conversation:
        if message.get("tool_calls"):
            message = dict(message)
            calls = []
            for call in message["tool_calls"]:
                call = copy.deepcopy(call)
                function = call.get("function", {})
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except ValueError:
                        pass
                calls.append(call)
            message["tool_calls"] = calls
        messages.append(message)
    return messages


class PromptRenderer:
    """Renders and tokenizes prompts for one model, and fits answers into its context window."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def prepare(self, items: list[PromptLike], raw: bool, system: str,
                template: dict[str, Any] | None = None) -> list[Prepared]:
        """Every prompt's text and token ids; raises :class:`PromptTooLongError` when one cannot
        leave room for a single answer token. ``template``: further chat template arguments."""
        texts: list[str | None] = [None] * len(items)
        special: list[bool | None] = [True] * len(items)  # whether encoding adds the model's special tokens
        chats: list[tuple[int, list[Message]]] = []
        given: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            if isinstance(item, TokenPrompt):  # sent as is; its text only shown
                given[i] = list(item.token_ids)
                texts[i] = self.tokenizer.decode(given[i], clean_up_tokenization_spaces=False)
                special[i] = None
                continue
            if isinstance(item, str) and raw:
                texts[i] = item
                continue
            messages = conversation_of(item, system)
            if self.has_chat_template:
                chats.append((i, messages))
                special[i] = False  # the template already holds them
            else:  # a base model without a template: the contents as plain text
                texts[i] = "\n\n".join(m["content"] for m in messages)
        if chats:
            for (i, _), text in zip(chats, self._render_chats([m for _, m in chats], template or {})):
                texts[i] = text
        token_lists: list[list[int]] = [given.get(i, []) for i in range(len(items))]
        for flag in (True, False):
            group = [i for i in range(len(items)) if special[i] is flag]
            if group:
                for i, ids in zip(group, self._encode([texts[i] for i in group], flag)):
                    token_lists[i] = ids
        for ids in token_lists:
            if len(ids) >= self.max_model_len:
                raise PromptTooLongError(
                    f"the prompt has {len(ids)} tokens but the model's context holds {self.max_model_len} "
                    "(prompt plus answer); shorten it or load with a larger --max-model-len")
        return [Prepared(text, ids) for text, ids in zip(texts, token_lists)]

    def fit(self, params: Any, prompt_tokens: int) -> Any:
        """``params`` with ``max_tokens`` bounded by the room the prompt leaves in the context."""
        room = self.max_model_len - prompt_tokens
        if params.max_tokens is None or params.max_tokens > room:
            params = params.clone()
            params.max_tokens = room
        return params

    # ----- batched template and tokenizer calls ---------------------------------------------------
    def _batched(self) -> bool:
        """Whether the tokenizer is a Hugging Face one (its calls take lists); vLLM's other
        tokenizers (Mistral's, custom ones) are used one text at a time."""
        try:
            from transformers import PreTrainedTokenizerBase
        except ImportError:  # pragma: no cover - vLLM depends on transformers
            return False
        return isinstance(self.tokenizer, PreTrainedTokenizerBase)

    def _render_chats(self, conversations: list[list[Message]], template: dict[str, Any]) -> list[str]:
        if template or any(m.get("tool_calls") for c in conversations for m in c):
            conversations = [template_messages(c) for c in conversations]

        def one(messages: list[Message]) -> str:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template)

        if len(conversations) > 1 and self._batched():
            try:
                rendered = self.tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True,
                                                              **template)
            except Exception:  # noqa: BLE001 - one by one below reports the failing conversation's error
                rendered = None
            if isinstance(rendered, list) and len(rendered) == len(conversations) and all(
                    isinstance(t, str) for t in rendered):
                return rendered
        return [one(messages) for messages in conversations]

    def _encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        if len(texts) > 1 and self._batched():
            try:
                encoded = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
            except Exception:  # noqa: BLE001 - the per-text path below reports real errors
                encoded = None
            if encoded is not None and len(encoded) == len(texts):
                return [list(ids) for ids in encoded]
        if add_special_tokens:  # the plain call, exactly as before batching
            return [list(self.tokenizer.encode(text)) for text in texts]
        return [list(self.tokenizer.encode(text, add_special_tokens=False)) for text in texts]
