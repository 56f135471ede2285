"""The seam between the engine session and what runs a model.

An :class:`EngineSession` owns at most one awake :class:`Backend`: the in-process vLLM engine
(:class:`~vllm_magic.engine.backends.local.LocalBackend`, ``kind == "local"``) or a vLLM server
elsewhere (:class:`~vllm_magic.engine.backends.remote.RemoteBackend`, ``kind == "remote"``). The
session does what is the same for every engine (defaults, request ids, checks, counters, listeners,
status); a backend turns a batch of prompts and options into ready requests in one call
(:meth:`Backend.prepare_requests`), runs them (:meth:`~Backend.add`, :meth:`~Backend.abort`), reports
its health and memory, sleeps where it can, and shuts down. Nobody outside a backend reads its
private members, and nobody tells the kinds apart by anything but :attr:`Backend.kind`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

from ...errors import ConfigError, NoEngineError, SleepError
from ..config import EngineConfig
from ..requests.adapters import Adapter, AdapterError, adapter_names, unknown_adapter
from ..requests.handles import RequestHandle
from ..requests.prompts import Prepared, PromptLike
from ..requests.tool_calls import render_with_tools

__all__ = ["Backend", "RequestOptions", "ReadyRequest", "UnloadReport", "SleepReport"]


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


@dataclass(frozen=True)
class RequestOptions:
    """What a batch asks for besides its prompts, as every front-end gives it to the session."""

    #: Prompts as plain completion text (no chat template), and the system message of chat prompts.
    raw: bool = False
    system: str = ""
    #: Sampling options over the session's defaults (``temperature=0``, ``max_tokens=5``, ...).
    overrides: dict[str, Any] = field(default_factory=dict)
    #: ``json_schema``, ``regex`` or ``choice``: the one constraint on the answer, if any.
    structured: dict[str, Any] = field(default_factory=dict)
    #: A ready vLLM ``SamplingParams`` used as given, instead of defaults, overrides and constraint.
    sampling: Any = None
    #: OpenAI tool dicts, and further chat template arguments (``enable_thinking``, ...).
    tools: list[dict[str, Any]] | None = None
    template: dict[str, Any] | None = None
    #: Whether the caller watches the answers grow. False lets a server elsewhere send each answer
    #: whole, the batch in one HTTP request (no per-token events for nobody); the handles then get
    #: each answer in one piece when it is done.
    stream: bool = True
    #: The registered LoRA adapter to answer with (None or ``"base"``: the model without one).
    lora: str | None = None


@dataclass(frozen=True)
class ReadyRequest:
    """One prompt as its engine runs it: text and token ids, and sampling parameters in the
    engine's form, bounded to the room the prompt leaves in the context window."""

    prompt: Prepared
    params: Any
    #: :attr:`RequestOptions.stream` of its batch.
    stream: bool = True
    #: The adapter it runs with, in the engine's form (vLLM's ``LoRARequest``, a server's model
    #: name), or None.
    lora: Any = None


class Backend(abc.ABC):
    """One running engine, as the session drives it."""

    #: ``"local"``: an engine in this process, its processes bound to this kernel;
    #: ``"remote"``: a vLLM server elsewhere, which keeps running when the session lets it go.
    kind: ClassVar[Literal["local", "remote"]]
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
    #: The server's URL (``kind == "remote"``), else None: shown in status lines.
    url: str | None = None
    #: How the weights are quantized (``"awq"``, ...), or None.
    quantization: str | None = None
    #: The sleep it is in (``%vllm_sleep``), or None while it is awake.
    asleep: SleepReport | None = None
    #: Device memory in use before this engine started (what an unload waits to get back), or None.
    memory_before_load: int | None = None
    #: The persisted engine it is attached to (a :class:`~.persisted.PersistedEngine`), or None.
    persisted: Any = None
    #: How much of a shared GPU it was given (a :class:`~..gpu_memory.MemoryPlan`), or None.
    memory_plan: Any = None
    #: The most logprobs per token it returns (vLLM's ``max_logprobs``; -1: the whole vocabulary),
    #: and which ones (vLLM's ``logprobs_mode``); None where a server elsewhere decides.
    max_logprobs: int | None = None
    logprobs_mode: str | None = None
    #: The most sequences it runs at once (vLLM's ``max_num_seqs``), or None where unknown.
    max_num_seqs: int | None = None
    #: Tokens per KV cache block: the prefix cache serves whole blocks (None where unknown).
    block_size: int | None = None
    #: Whether it runs LoRA adapters (vLLM's ``--enable-lora``; a server's: whether it lists any or
    #: takes them at runtime), and the highest rank it takes (None where unknown).
    lora_enabled: bool = False
    max_lora_rank: int | None = None

    # ----- requests ---------------------------------------------------------------------------------
    def prepare_requests(self, prompts: list[PromptLike], options: RequestOptions,
                         defaults: Any) -> list[ReadyRequest]:
        """The batch's ready requests, in one call: sampling parameters built once (from
        ``defaults`` and ``options``), every prompt rendered (chat template, tools, template
        arguments) and tokenized, and each request's ``max_tokens`` fitted to its context."""
        if options.sampling is not None:
            sampling = self._given_params(options.sampling)
        else:
            sampling = self._params(defaults, options.overrides, options.structured)
        lora = self.lora_request(options.lora)
        rendered = render_with_tools(self.render, prompts, options.raw, options.system, options.tools,
                                     options.template, cache_key=self)
        return [ReadyRequest(prompt, self._fit(sampling, len(prompt.token_ids)), options.stream, lora)
                for prompt in rendered]

    # ----- LoRA adapters ----------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, Adapter]:
        """The LoRA adapters requests can name here, by name."""
        return {}

    def lora_refusal(self) -> str | None:
        """Why requests here cannot name an adapter, or None when they can."""
        if self.lora_enabled:
            return None
        return ("LoRA adapters need an engine started with --enable-lora: %vllm_load MODEL --enable-lora "
                "--max-lora-rank R (vLLM's flags)")

    def lora_request(self, name: str | None) -> Any:
        """The adapter ``name`` in this engine's request form (None: no adapter); one line naming
        the registered adapters when there is no such one."""
        name = adapter_names(name)
        if name is None:
            return None
        refusal = self.lora_refusal()
        if refusal is not None and name not in self.adapters:
            raise AdapterError(f"--lora {name}: {refusal}")
        adapter = self.adapters.get(name)
        if adapter is None:
            raise unknown_adapter(name, sorted(self.adapters))
        return self._engine_lora(adapter)

    def _engine_lora(self, adapter: Adapter) -> Any:
        """``adapter`` in this engine's request form."""
        raise AdapterError(self.lora_refusal() or "this engine runs no adapters")

    def add_adapter(self, name: str, path: str, *, any_base: bool = False) -> Adapter:
        """Register the LoRA adapter in ``path`` under ``name`` (loading it now, so that a broken
        one is refused here, in one line, and the first request does not wait for it)."""
        raise AdapterError(self.lora_refusal() or "this engine takes no adapters")

    def remove_adapter(self, name: str) -> Adapter:
        """Forget the adapter ``name`` (and free what the engine held for it)."""
        raise unknown_adapter(name, sorted(self.adapters))

    @abc.abstractmethod
    def render(self, prompts: list[PromptLike], raw: bool, system: str,
               template: dict[str, Any] | None = None) -> list[Prepared]:
        """Each prompt's text and token ids (chat template applied unless ``raw``); ``template``
        holds further arguments of the chat template (``tools``, ``enable_thinking``, ...). Raises
        :class:`~vllm_magic.errors.PromptTooLongError` for a prompt that leaves no room to answer."""

    @abc.abstractmethod
    def _params(self, defaults: Any, overrides: dict[str, Any], structured: dict[str, Any]) -> Any:
        """One batch's sampling parameters, in this engine's form."""

    @abc.abstractmethod
    def _given_params(self, sampling: Any) -> Any:
        """A ready vLLM ``SamplingParams``, in this engine's form (streaming deltas)."""

    @abc.abstractmethod
    def _fit(self, params: Any, prompt_tokens: int) -> Any:
        """``params`` bounded to the room the prompt leaves in the context window."""

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer in this process (vLLM's reasoning and tool parsers read it)."""
        raise ConfigError(f"the {type(self).__name__} has no tokenizer of its model in this process")

    @property
    def chat_template(self) -> str | None:
        """The model's chat template where this process knows it (None: unknown here)."""
        return None

    def thinking_budget_refusal(self) -> str | None:
        """Why requests here cannot carry a thinking token budget, or None when they can (a server
        elsewhere decides for itself)."""
        return None

    @abc.abstractmethod
    def add(self, requests: list[tuple[RequestHandle, ReadyRequest]]) -> None:
        """Start requests; the engine fills their handles (:meth:`RequestHandle.push`,
        :meth:`RequestHandle.finish`)."""

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

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(llm)`` with the raw ``vllm.LLM`` between steps (only where there is one)."""
        raise NoEngineError(f"the {type(self).__name__} has no vllm.LLM in this process")

    @property
    def llm(self) -> Any:
        """The raw ``vllm.LLM`` (only where it runs in this process)."""
        raise NoEngineError(f"the {type(self).__name__} has no vllm.LLM in this process")

    # ----- health and memory ------------------------------------------------------------------------
    @abc.abstractmethod
    def death(self) -> str | None:
        """Why the engine cannot serve any more, or None while it can."""

    def died_message(self, reason: str) -> str:
        """What the user reads when a request finds the engine dead for ``reason``."""
        return f"the engine process died ({reason}); run %vllm_load again to restart it"

    @abc.abstractmethod
    def memory(self) -> tuple[int | None, str]:
        """``(bytes, what they are)`` the engine holds now."""

    def host_memory(self) -> int | None:
        """Host RAM its processes hold (a level-1 sleeping engine's weights live there), or None."""
        return None

    def weight_bytes(self) -> int | None:
        """About how many bytes its weights take (what a level-1 sleep copies to host RAM), or None."""
        return None

    def derived_args(self) -> dict[str, Any]:
        """Engine arguments the engine derived while starting (for "already loaded" decisions)."""
        return {"max_model_len": self.max_model_len, "dtype": self.dtype}

    def attached_to(self, url: str, api_key: str | None, model: str | None) -> bool:
        """Whether this is the server at ``url`` with ``api_key``, serving ``model`` (None: any)."""
        return False

    # ----- sleep mode -------------------------------------------------------------------------------
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

    # ----- stopping ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def shutdown(self, baseline: int | None | Literal["own"] = "own") -> UnloadReport:
        """Stop the engine (a server elsewhere: let go of it) and wait until what it held
        (processes, device memory) is returned: to ``baseline`` bytes of device memory in use
        ("own": what was in use before it started; None: do not wait, another shutdown waits)."""
