"""Reasoning kept apart from the answer.

The session's reasoning parser (:class:`~vllm_magic.engine.config.Parsers`) is not an engine
argument: the split is done on this side, on the generated text and token ids, so choosing or
changing a parser never restarts an engine, and a ``--remote`` server's answers are split the same way.

:class:`ReasoningSplitter` runs vLLM's reasoning parser over one request's deltas as they arrive
(``extract_reasoning_streaming``), so thinking streams apart from the answer, and settles each
finished answer with the parser's whole-text split (``extract_reasoning``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError

__all__ = ["ReasoningSplitter"]


class ReasoningSplitter:
    """Splits one request's answers into reasoning and content with vLLM's parser ``name``.

    One parser instance per answer (``n`` > 1 has several): vLLM's streaming parsers keep state.
    """

    def __init__(self, name: str, tokenizer: Any) -> None:
        from ..compat import reasoning_parser_class

        self._cls = reasoning_parser_class(name)
        self._tokenizer = tokenizer
        self.name = name
        self._states: dict[int, _State] = {}
        self._parser(0)  # a parser that cannot work with this tokenizer says so at submit time

    def _parser(self, index: int) -> "_State":
        state = self._states.get(index)
        if state is None:
            try:
                parser = self._cls(self._tokenizer)
            except Exception as exc:  # noqa: BLE001 - vLLM's parsers check the tokenizer's vocabulary
                raise ConfigError(f"vLLM's reasoning parser {self.name!r} does not work with this model: "
                                  f"{' '.join(str(exc).split())[:200]}") from None
            state = self._states[index] = _State(parser)
        return state

    def feed(self, index: int, text: str, token_ids: list[int]) -> tuple[str, str]:
        """``(reasoning, content)`` of one delta of answer ``index``."""
        state = self._parser(index)
        previous_text, previous_ids = state.text, state.token_ids
        state.text = previous_text + text
        state.token_ids = previous_ids + list(token_ids)
        try:
            delta = state.parser.extract_reasoning_streaming(
                previous_text, state.text, text, previous_ids, state.token_ids, list(token_ids))
        except Exception:  # noqa: BLE001 - a parser failing mid-stream: the answer settles at the end
            return "", ""
        if delta is None:
            return "", ""
        reasoning = getattr(delta, "reasoning", None)
        if reasoning is None:
            reasoning = getattr(delta, "reasoning_content", None)  # vLLM before the rename
        return reasoning or "", delta.content or ""

    def settle(self, index: int) -> tuple[str, str]:
        """``(reasoning, content)`` of the whole finished answer ``index``."""
        state = self._parser(index)
        parser = state.parser
        split = getattr(parser, "extract_reasoning", None) or parser.extract_reasoning_content
        reasoning, content = split(state.text, None)
        return reasoning or "", content or ""


@dataclass
class _State:
    parser: Any
    text: str = ""
    token_ids: list[int] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.token_ids = []
