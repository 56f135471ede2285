"""``VLLM``: the session's engine as a LangChain LLM (a drop-in for ``langchain_community``'s)."""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from ..engine.requests.handles import Completion, GenerationResult, RequestHandle
from ..engine.requests.logprobs import openai_completion_logprobs, visible_positions
from .base import EngineBase, await_all, usage_counts, wait_all

__all__ = ["VLLM"]


class VLLM(EngineBase, BaseLLM):
    """The session's vLLM engine as a LangChain LLM (text in, text out).

    Each string prompt goes through the model's chat template as one user message, as ``%%vllm``
    does; ``raw=True`` sends it as plain completion text (None: the session's mode, as the
    sampling panel sets it). ``batch`` submits all prompts to the engine at once; ``stream``
    yields token deltas; ``ainvoke``/``abatch``/``astream`` await the engine without blocking a
    thread, so concurrent calls are batched by vLLM's scheduler. Sampling fields (``temperature``,
    ``max_new_tokens`` alias ``max_tokens``, ``stop``, ``n``, ...) left unset follow the session's
    defaults.
    """

    raw: bool | None = None
    """Send prompts as plain completion text instead of through the chat template; None follows
    the session default (the sampling panel's chat/raw toggle)."""

    @property
    def max_new_tokens(self) -> int | None:
        """``langchain_community``'s name of ``max_tokens``."""
        return self.max_tokens

    @property
    def _llm_type(self) -> str:
        return "vllm"

    def _submit_prompts(self, prompts: list[str], stop: list[str] | None, kwargs: dict[str, Any],
                        stream: bool) -> list[RequestHandle]:
        raw = {} if self.raw is None or "raw" in kwargs else {"raw": self.raw}
        return self._submit(list(prompts), stop, kwargs, stream=stream, **raw)

    def _result(self, results: list[GenerationResult]) -> LLMResult:
        generations = [[Generation(text=c.text, generation_info=_info(r, c)) for c in r.completions]
                       for r in results]
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for r in results:
            for key, value in usage_counts(r).items():
                usage[key] += value
        return LLMResult(generations=generations, llm_output={"token_usage": usage, "model_name": self.model_name})

    def _chunk(self, text: str, handle: RequestHandle, last: bool) -> GenerationChunk:
        if not last:
            return GenerationChunk(text=text)
        return GenerationChunk(text="", generation_info=_info(handle.snapshot()))

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        return self._result(wait_all(self._submit_prompts(prompts, stop, kwargs, stream=False), self.timeout))

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        yield from self._stream_handle(self._submit_prompts([prompt], stop, kwargs, stream=True)[0], run_manager)

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        return self._result(await await_all(self._submit_prompts(prompts, stop, kwargs, stream=False), self.timeout))

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        async for chunk in self._astream_handle(self._submit_prompts([prompt], stop, kwargs, stream=True)[0],
                                                run_manager):
            yield chunk


def _info(result: GenerationResult, completion: Completion | None = None) -> dict[str, Any]:
    """``generation_info``: why the answer ended, the request's token counts, and with ``logprobs=K``
    the answer's logprobs in OpenAI's completions shape (as ``langchain_openai.OpenAI`` gives them)."""
    completion = completion or (result.completions[0] if result.completions else None)
    finish = completion.finish_reason if completion is not None else None
    info = {"finish_reason": finish or result.finish_reason, **usage_counts(result)}
    if completion is not None and completion.logprobs is not None:
        info["logprobs"] = openai_completion_logprobs(
            visible_positions(completion.logprobs, completion.text, completion.finish_reason))
    return info
