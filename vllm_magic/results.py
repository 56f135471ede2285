"""The value of a ``%%vllm`` cell: the answer plus everything needed to reproduce or inspect it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .handles import GenerationResult

__all__ = ["VllmResult"]


@dataclass(repr=False, eq=False)
class VllmResult:
    """One answer of a ``%%vllm`` cell.

    ``text`` is the answer (``str(result)`` too), ``parsed`` the structured value for ``--json``,
    ``--regex`` and ``--choice`` (None otherwise), ``prompt`` the exact text sent to the model after
    the chat template, ``user_prompt`` the cell's prompt after ``{name}`` interpolation,
    ``sampling_params`` the ``SamplingParams`` that reached the engine, ``generation`` the full
    :class:`~vllm_magic.handles.GenerationResult` (token ids, every completion of ``-n``).

    Its repr is one compact line: the cell already showed the answer while it streamed.
    """

    generation: GenerationResult
    user_prompt: str
    sampling_params: Any = None
    parsed: Any = None
    messages: list[dict] = field(default_factory=list)

    # ----- the answer ---------------------------------------------------------------------------
    @property
    def text(self) -> str:
        return self.generation.text

    @property
    def texts(self) -> list[str]:
        """Every completion's text (``-n 3`` gives three)."""
        return [c.text for c in self.generation.completions]

    @property
    def prompt(self) -> str:
        return self.generation.prompt

    @property
    def token_ids(self) -> list[int]:
        return self.generation.token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.generation.finish_reason

    @property
    def interrupted(self) -> bool:
        """True when the generation was stopped (Ctrl-C, Stop button) before it finished."""
        return self.generation.aborted

    # ----- metrics -------------------------------------------------------------------------------
    @property
    def prompt_tokens(self) -> int:
        return self.generation.prompt_tokens

    @property
    def tokens(self) -> int:
        """Generated tokens, over all completions."""
        return self.generation.output_tokens

    @property
    def ttft(self) -> float | None:
        """Seconds from submission to the first generated text."""
        return self.generation.ttft

    @property
    def elapsed(self) -> float:
        return self.generation.elapsed

    @property
    def tokens_per_second(self) -> float | None:
        return self.generation.tokens_per_second

    @property
    def metrics(self) -> dict[str, Any]:
        """Tokens, timings and rates as a dict (handy for a DataFrame of many results)."""
        return {"prompt_tokens": self.prompt_tokens, "tokens": self.tokens, "ttft": self.ttft,
                "elapsed": self.elapsed, "tokens_per_second": self.tokens_per_second,
                "finish_reason": self.finish_reason, "interrupted": self.interrupted}

    # ----- display -------------------------------------------------------------------------------
    def show(self, format: str = "markdown") -> None:
        """Render the answer again (``markdown``, ``text``, ``code`` or ``json``)."""
        from IPython.display import display

        from .display import answer_bundle

        display(answer_bundle(self.text, format, parsed=self.parsed), raw=True)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        state = "interrupted" if self.interrupted else f"finish_reason={self.finish_reason!r}"
        extra = "" if self.parsed is None else f", parsed={_short(repr(self.parsed), 60)}"
        n = len(self.generation.completions)
        completions = f", n={n}" if n > 1 else ""
        return f"VllmResult({_short(repr(self.text), 48)}, tokens={self.tokens}{completions}, {state}{extra})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 2] + "…" + text[-1]
