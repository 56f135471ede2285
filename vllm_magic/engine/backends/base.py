"""The seam between the engine session and what actually runs a model.

An :class:`EngineSession` owns at most one :class:`Backend`: the in-process vLLM engine
(:class:`~vllm_magic.engine.backends.local.LocalBackend`) or a vLLM server elsewhere
(:class:`~vllm_magic.engine.backends.remote.RemoteBackend`). The session does everything that is the same
for all of them (defaults, the merge of sampling options, request ids, counters, listeners,
status); a backend only starts, turns options and prompts into what its engine takes, runs
requests, reports its health and memory, and shuts down.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable

from ...errors import ConfigError, SleepError
from ..config import EngineConfig
from ..requests.handles import RequestHandle
from ..requests.prompts import Prepared, PromptLike

__all__ = ["Backend", "UnloadReport", "SleepReport"]


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


@dataclass
class SleepReport:
    """One sleep of an engine: its level, how long it took and what it gave back."""

    model: str
    level: int
    seconds: float
    #: Device memory in use before and after (all GPUs, NVML), or None where it cannot be read.
    device_memory_before: int | None
    device_memory_after: int | None
    #: ``time.monotonic()`` when it fell asleep.
    since: float = 0.0

    @property
    def freed_bytes(self) -> int | None:
        if self.device_memory_before is None or self.device_memory_after is None:
            return None
        return max(0, self.device_memory_before - self.device_memory_after)

    @property
    def holds(self) -> str:
        """What the sleeping engine still holds, in words."""
        if self.level == 1:
            return "weights in host RAM, KV cache discarded"
        return "nothing of the model: weights and KV cache discarded (waking reloads the weights)"


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
    #: How the weights are quantized (``"awq"``, ...), or None.
    quantization: str | None = None
    #: The sleep it is in (``%vllm_sleep``), or None while it is awake.
    asleep: SleepReport | None = None

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

    def sleep_refusal(self, level: int) -> str | None:
        """Why this engine cannot sleep at ``level``, or None when it can."""
        return ("sleep mode needs an engine in this kernel on an NVIDIA GPU (vLLM's sleep mode); "
                "a vLLM server elsewhere sleeps through its own /sleep endpoint")

    def sleep(self, level: int = 1) -> SleepReport:
        """Free the engine's device memory (level 1: weights to host RAM; level 2: weights discarded);
        requests still running are aborted. Raises :class:`SleepError` where it cannot."""
        raise SleepError(self.sleep_refusal(level) or "this engine cannot sleep")

    def wake(self) -> float:
        """Take the device memory back (reloading the weights after level 2); returns the seconds it
        took (0.0 when it was awake)."""
        if self.asleep is None:
            return 0.0
        raise SleepError("this engine cannot wake")  # pragma: no cover - only engines that slept wake

    @abc.abstractmethod
    def shutdown(self) -> UnloadReport:
        """Stop the engine and wait until what it held (processes, memory) is returned."""
