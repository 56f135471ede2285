"""The live engine as LangChain models: ``VLLM`` (an LLM) and ``ChatVLLM`` (a chat model).

``VLLM`` is a drop-in for ``langchain_community.llms.VLLM`` (same constructor fields), but it
never builds an engine of its own: it attaches to the kernel's engine, or loads its configuration
through the session (replacing the live engine). Sampling fields left unset follow the session's
defaults (the sampling widgets, ``%config``); fields you set, and call-time arguments, win.

>>> from vllm_magic.langchain import VLLM
>>> llm = VLLM(model="SmolLM2-135M-Instruct", max_new_tokens=128, temperature=0.8)  # doctest: +SKIP
>>> llm.invoke("What is the capital of France ?")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import AliasChoices, Field

from .handles import GenerationResult, RequestHandle
from .langchain_chat import ChatVLLM
from .langchain_engine import (EngineFields, adeltas, await_all, call_overrides, deltas, usage_counts,
                               user_errors, wait_all)

__all__ = ["VLLM", "ChatVLLM"]


class VLLM(EngineFields, BaseLLM):
    """The session's vLLM engine as a LangChain LLM (text in, text out).

    Each string prompt goes through the model's chat template as one user message, as ``%%vllm``
    does; ``raw=True`` sends it as plain completion text. ``batch`` submits all prompts to the
    engine at once; ``stream`` yields token deltas; ``ainvoke``/``abatch``/``astream`` await the
    engine without blocking a thread, so concurrent calls are batched by vLLM's scheduler.
    """

    n: int = 1
    """Number of answers per prompt (each one a ``Generation``)."""
    presence_penalty: float | None = None
    """Penalty for tokens already present; None follows the session default."""
    frequency_penalty: float | None = None
    """Penalty proportional to how often a token appeared; None follows the session default."""
    temperature: float | None = None
    """Sampling temperature, 0 is greedy; None follows the session default."""
    top_p: float | None = None
    """Nucleus sampling; None follows the session default."""
    top_k: int | None = None
    """Keep the top_k most likely tokens (-1 or 0 disables); None follows the session default."""
    min_p: float | None = None
    """Drop tokens less likely than min_p times the most likely; None follows the session default."""
    repetition_penalty: float | None = None
    """Penalty > 1 discourages repetition; None follows the session default."""
    seed: int | None = None
    """Random seed for reproducible sampling; None follows the session default."""
    stop: list[str] | None = None
    """Strings that end generation; a ``stop`` given at call time wins."""
    ignore_eos: bool = False
    """Keep generating after the end-of-sequence token (benchmarks)."""
    max_new_tokens: int | None = Field(default=None, validation_alias=AliasChoices("max_new_tokens", "max_tokens"))
    """Most tokens per answer (vLLM's ``max_tokens``); None follows the session default."""
    logprobs: int | None = None
    """Number of log probabilities vLLM computes per output token."""
    raw: bool = False
    """Send prompts as plain completion text instead of through the chat template."""

    @property
    def _llm_type(self) -> str:
        return "vllm"

    @property
    def _default_params(self) -> dict[str, Any]:
        """The sampling overrides of this object: only the fields that are set (the rest follow
        the session's defaults). The only place they are assembled."""
        params = {
            "n": self.n if self.n != 1 else None, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
            "seed": self.seed, "stop": self.stop, "max_tokens": self.max_new_tokens,
            "ignore_eos": self.ignore_eos or None, "logprobs": self.logprobs,
        }
        return {k: v for k, v in params.items() if v is not None}

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, **self._default_params}

    # ----- shared by the sync and async paths ----------------------------------------------------
    def _submit(self, prompts: list[str], stop: list[str] | None, kwargs: dict[str, Any]) -> list[RequestHandle]:
        sampling, options = call_overrides(self._default_params, stop, kwargs, type(self).__name__)
        options.setdefault("raw", self.raw)
        with user_errors():
            return self._live_session().submit(list(prompts), **options, **sampling)

    def _result(self, results: list[GenerationResult]) -> LLMResult:
        generations = [[Generation(text=c.text, generation_info=_info(r, c.finish_reason)) for c in r.completions]
                       for r in results]
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for r in results:
            for key, value in usage_counts(r).items():
                usage[key] += value
        return LLMResult(generations=generations, llm_output={"token_usage": usage, "model_name": self.model_name})

    # ----- sync ---------------------------------------------------------------------------------
    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        handles = self._submit(prompts, stop, kwargs)
        return self._result(wait_all(handles, self.timeout))

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        handle = self._submit([prompt], stop, kwargs)[0]
        try:
            # Each delta goes out as soon as it arrives; finish reason and token counts follow on
            # a final empty chunk (holding a delta back to mark it last would cost one decode step).
            for text in deltas(handle, self.timeout):
                chunk = GenerationChunk(text=text)
                if run_manager:
                    run_manager.on_llm_new_token(text, chunk=chunk)
                yield chunk
            chunk = GenerationChunk(text="", generation_info=_info(handle.result()))
            if run_manager:
                run_manager.on_llm_new_token("", chunk=chunk)
            yield chunk
        finally:
            handle.abort()  # a consumer that stops early frees the engine (no-op once finished)

    # ----- async --------------------------------------------------------------------------------
    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        handles = self._submit(prompts, stop, kwargs)
        return self._result(await await_all(handles, self.timeout))

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        handle = self._submit([prompt], stop, kwargs)[0]
        try:
            async for text in adeltas(handle, self.timeout):
                chunk = GenerationChunk(text=text)
                if run_manager:
                    await run_manager.on_llm_new_token(text, chunk=chunk)
                yield chunk
            chunk = GenerationChunk(text="", generation_info=_info(await handle))
            if run_manager:
                await run_manager.on_llm_new_token("", chunk=chunk)
            yield chunk
        finally:
            handle.abort()


def _info(result: GenerationResult, finish_reason: str | None = None) -> dict[str, Any]:
    """``generation_info``: why the answer ended, and the request's token counts."""
    return {"finish_reason": finish_reason or result.finish_reason, **usage_counts(result)}
