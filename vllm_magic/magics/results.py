"""The value of a ``%%vllm`` cell: the answer plus everything needed to reproduce or inspect it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..engine.requests.handles import GenerationResult

__all__ = ["VllmResult"]


def _from_generation(name: str, doc: str) -> Any:
    """A read-only attribute that is the generation's ``name``."""
    return property(lambda self: getattr(self.generation, name), doc=doc)


@dataclass(repr=False, eq=False)
class VllmResult:
    """One answer of a ``%%vllm`` cell.

    ``text`` is the answer (``str(result)`` too), ``parsed`` the structured value for ``--json``,
    ``--regex`` and ``--choice`` (None otherwise), ``reasoning`` the model's thinking (with a
    reasoning parser), ``prompt`` the exact text sent to the model after
    the chat template, ``user_prompt`` the cell's prompt after ``{name}`` interpolation,
    ``sampling_params`` the ``SamplingParams`` that reached the engine (``RemoteParams`` on a
    ``--remote`` session), ``generation`` the full
    :class:`~vllm_magic.engine.requests.handles.GenerationResult` (token ids, every completion of ``-n``).

    Its repr is one compact line: the cell already showed the answer while it streamed.
    """

    generation: GenerationResult
    user_prompt: str
    sampling_params: Any = None
    parsed: Any = None
    messages: list[dict] = field(default_factory=list)

    # ----- the answer and its metrics, read from the generation ----------------------------------
    text = _from_generation("text", "The answer (the first completion's text), without the model's thinking.")
    reasoning = _from_generation("reasoning", "The model's thinking, kept apart from the answer by the session's "
                                 "reasoning parser (%vllm_load ... --reasoning-parser NAME); \"\" without one.")
    prompt = _from_generation("prompt", "The exact text sent to the model, after the chat template.")
    token_ids = _from_generation("token_ids", "The answer's token ids.")
    finish_reason = _from_generation("finish_reason", "Why the answer ended: ``stop``, ``length`` or ``abort``.")
    interrupted = _from_generation("aborted", "True when the generation was stopped (Ctrl-C, Stop button) "
                                   "before it finished.")
    prompt_tokens = _from_generation("prompt_tokens", "Tokens of the prompt.")
    tokens = _from_generation("output_tokens", "Generated tokens, over all completions.")
    ttft = _from_generation("ttft", "Seconds from submission to the first generated text.")
    elapsed = _from_generation("elapsed", "Seconds from submission to the end.")
    tokens_per_second = _from_generation("tokens_per_second", "Decode rate after the first token.")
    logprobs = _from_generation("logprobs", "Per answer token (``--logprobs K``): its id, text, logprob, rank and the "
                                "top K alternatives (:class:`~vllm_magic.engine.requests.logprobs.TokenLogprobs`); "
                                "None unless asked for.")
    prompt_logprobs = _from_generation("prompt_logprobs", "Per prompt token (``--prompt-logprobs K``), None for the "
                                       "first; None unless asked for.")
    perplexity = _from_generation("perplexity", "exp(-mean logprob) of the answer's tokens (needs --logprobs).")
    mean_logprob = _from_generation("mean_logprob", "The mean logprob of the answer's tokens (needs --logprobs).")
    prompt_perplexity = _from_generation("prompt_perplexity", "The perplexity of the prompt's tokens (needs "
                                         "--prompt-logprobs).")
    logprobs_kind = _from_generation("logprobs_kind", "Which probabilities the logprobs are, in words: the model's "
                                     "raw ones or those after temperature and top-p (vLLM's logprobs_mode).")
    cached_tokens = _from_generation("cached_tokens", "Prompt tokens served from vLLM's prefix cache (None where the "
                                     "engine does not say).")
    lora = _from_generation("lora", "The LoRA adapter that answered (``--lora NAME``), or None for the model "
                            "without one.")

    @property
    def texts(self) -> list[str]:
        """Every completion's text (``-n 3`` gives three)."""
        return [c.text for c in self.generation.completions]

    @property
    def metrics(self) -> dict[str, Any]:
        """Tokens, timings and rates as a dict (handy for a DataFrame of many results)."""
        return {"prompt_tokens": self.prompt_tokens, "tokens": self.tokens, "ttft": self.ttft,
                "elapsed": self.elapsed, "tokens_per_second": self.tokens_per_second,
                "cached_tokens": self.cached_tokens, "mean_logprob": self.mean_logprob, "lora": self.lora,
                "finish_reason": self.finish_reason, "interrupted": self.interrupted}

    # ----- display -------------------------------------------------------------------------------
    def explore(self, session: Any = None) -> Any:
        """A :class:`~vllm_magic.widgets.explorer.TokenExplorer` of this answer: its tokens coloured by
        probability, their alternatives, and branches from any of them (needs ``--logprobs K``)."""
        from ..widgets.explorer import TokenExplorer

        return TokenExplorer(self, session)

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
