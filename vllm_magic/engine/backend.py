"""The seam between the engine session and what actually runs a model.

An :class:`EngineSession` owns at most one :class:`Backend`: the in-process vLLM engine
(:class:`~vllm_magic.engine.local.LocalBackend`) or a vLLM server elsewhere
(:class:`~vllm_magic.engine.remote.RemoteBackend`). The session does everything that is the same
for all of them (defaults, the merge of sampling options, request ids, counters, listeners,
status); a backend only starts, turns options and prompts into what its engine takes, runs
requests, reports its health and memory, and shuts down.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError
from .config import EngineConfig
from .handles import RequestHandle
from .prompts import Prepared, PromptLike

__all__ = ["Backend", "UnloadReport"]


@dataclass
class UnloadReport:
    """What the last unload left behind: engine processes and device memory."""

    model: str
    processes: int
    processes_killed: int
    device_memory_before_load: int | None
    device_memory_after_unload: int | None

    #: Allocator and driver bookkeeping that is not the engine's.
    SLACK = 256 << 20

    @property
    def device_memory_returned(self) -> bool | None:
        if self.device_memory_before_load is None or self.device_memory_after_unload is None:
            return None
        return self.device_memory_after_unload <= self.device_memory_before_load + self.SLACK


class Backend(abc.ABC):
    """One running engine, as the session drives it."""

    #: The configuration it runs.
    config: EngineConfig
    #: What the engine runs with: ``dtype``, ``max_model_len``, KV cache size in tokens (or None).
    dtype: str
    max_model_len: int
    kv_cache_tokens: int | None
    #: Seconds the start took, and when it finished (``time.monotonic()``).
    load_seconds: float
    started: float
    #: The vLLM version that runs the engine.
    vllm_version: str
    #: The server's URL when the engine runs elsewhere (``%vllm_load --remote``), else None.
    url: str | None = None

    @abc.abstractmethod
    def params(self, defaults: Any, overrides: dict[str, Any], structured: dict[str, Any]) -> Any:
        """One request's sampling parameters, in this engine's form, from the session's defaults,
        the call's overrides and its ``json_schema``/``regex``/``choice`` constraint."""

    @abc.abstractmethod
    def given_params(self, sampling: Any) -> Any:
        """A ready vLLM ``SamplingParams``, in this engine's form (streaming deltas)."""

    @abc.abstractmethod
    def prepare(self, items: list[PromptLike], raw: bool, system: str,
                template: dict[str, Any] | None = None) -> list[Prepared]:
        """Each prompt's text and token ids (chat template applied unless ``raw``); ``template``
        holds further arguments of the chat template (``tools``, ``enable_thinking``, ...)."""

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer in this process (vLLM's reasoning and tool parsers read it)."""
        raise ConfigError(f"the {type(self).__name__} has no tokenizer of its model in this process")

    @abc.abstractmethod
    def fit(self, params: Any, prompt_tokens: int) -> Any:
        """``params`` bounded to the room the prompt leaves in the context window."""

    @abc.abstractmethod
    def add(self, requests: list[tuple[RequestHandle, Prepared, Any]]) -> None:
        """Start ``(handle, prompt, SamplingParams)`` requests; the engine fills the handles."""

    @abc.abstractmethod
    def abort(self, request_ids: list[str]) -> None:
        """Stop requests; returns once the engine has dropped them (or briefly after)."""

    @abc.abstractmethod
    def abort_all(self) -> int:
        """Stop every live request; returns how many there were."""

    @property
    @abc.abstractmethod
    def live_count(self) -> int:
        """Requests running now."""

    @abc.abstractmethod
    def death(self) -> str | None:
        """Why the engine cannot serve any more, or None while it can."""

    def died_message(self, reason: str) -> str:
        """What the user reads when a request finds the engine dead for ``reason``."""
        return f"the engine process died ({reason}); run %vllm_load again to restart it"

    @abc.abstractmethod
    def memory(self) -> tuple[int | None, str]:
        """``(bytes, what they are)`` the engine holds now."""

    def derived_args(self) -> dict[str, Any]:
        """Engine arguments the engine derived while starting (for "already loaded" decisions)."""
        return {"max_model_len": self.max_model_len, "dtype": self.dtype}

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn`` with the raw engine object between steps (only where there is one)."""
        raise NotImplementedError(f"{type(self).__name__} has no engine object in this process")

    @abc.abstractmethod
    def shutdown(self) -> UnloadReport:
        """Stop the engine and wait until what it held (processes, memory) is returned."""
