"""The in-process vLLM engine behind the session's backend seam.

:meth:`LocalBackend.start` quiets vLLM's logs into the session's log file, starts ``vllm.LLM`` with
its processes shielded from the kernel's interrupts and bound to the kernel's life (see
:mod:`.processes`), and hands the engine to one driver thread. :meth:`~LocalBackend.shutdown`
stops it and waits until its processes and device memory are gone. An exit hook shuts down every
engine still running when the interpreter exits.
"""

from __future__ import annotations

import gc
import json
import os
import select
import threading
import time
import weakref
from typing import Any, Callable

from ...errors import ConfigError, EngineStartError, SleepError
from .base import Backend, ReadyRequest, SleepReport, UnloadReport
from ..requests.adapters import Adapter, AdapterError, check_fits, read_adapter, unknown_adapter
from ..config import EngineConfig
from ..gpu_memory import (DoesNotFit, MemoryPlan, device_memory_used, estimate_weight_bytes, gpu_memory_of,
                          memory_error_line, plan as plan_gpu_memory)
from ..platform import thread_binding_for_start
from .driver import EngineDriver
from ..requests.handles import RequestHandle
from ..log import EngineLog
from .processes import at_exit, end_processes, engine_processes_guarded
from ..requests.prompts import Prepared, PromptLike, PromptRenderer
from ..requests.sampling import build_sampling_params

__all__ = ["LocalBackend", "device_memory_used"]

# multiprocessing's words when a spawned process re-imports a script that starts processes at import.
_BOOTSTRAP_ERROR = "finished its bootstrapping phase"
_SCRIPT_NEEDS_MAIN_GUARD = (
    "vLLM could not start its engine: this script loads the model when it is imported. vLLM starts "
    "its engine in a new Python process (the 'spawn' method, the only one on CPU and the safe one "
    "with CUDA), which imports the script again, so that process tried to start an engine of its "
    "own. Put the code that loads the model under `if __name__ == \"__main__\":` (raw vLLM needs "
    "the same); notebooks and the IPython shell need nothing.")


class LocalBackend(Backend):
    """A ``vllm.LLM`` in this process, driven by one thread, with its engine processes."""

    kind = "local"

    def __init__(self, llm: Any, config: EngineConfig, children: set[int], load_seconds: float,
                 memory_before_load: int | None, on_finished: Callable[[RequestHandle], None],
                 memory_plan: MemoryPlan | None = None) -> None:
        self._llm = llm
        self.config = config
        #: How much of a shared GPU the engine was given (None: vLLM's own sizing, or not a GPU).
        self.memory_plan = memory_plan
        self.children = children
        self.load_seconds = load_seconds
        self.memory_before_load = memory_before_load
        self.started = time.monotonic()
        model_config = llm.llm_engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.dtype = str(model_config.dtype).replace("torch.", "")
        self.quantization = getattr(model_config, "quantization", None)
        reasoning = getattr(llm.llm_engine.vllm_config, "reasoning_config", None)
        #: Whether vLLM holds thinking to a token budget here (``--thinking-budget``): only an engine
        #: started with vLLM's reasoning config knows where thinking ends (vLLM 0.26 has no budget).
        self._reasoning_config = bool(reasoning is not None and getattr(reasoning, "enabled", False))
        cache = llm.llm_engine.vllm_config.cache_config
        self.max_logprobs = getattr(model_config, "max_logprobs", None)
        self.logprobs_mode = str(getattr(model_config, "logprobs_mode", "raw_logprobs"))
        self.max_num_seqs = getattr(llm.llm_engine.vllm_config.scheduler_config, "max_num_seqs", None)
        self.block_size = getattr(cache, "block_size", None)
        lora = getattr(llm.llm_engine.vllm_config, "lora_config", None)
        self.lora_enabled = lora is not None
        self.max_lora_rank = getattr(lora, "max_lora_rank", None)
        self._adapters: dict[str, Adapter] = {}
        self._hidden_size = getattr(getattr(model_config, "hf_config", None), "hidden_size", None)
        self._served_name = getattr(model_config, "served_model_name", None)
        blocks = getattr(cache, "num_gpu_blocks", None)
        self.kv_cache_tokens = int(blocks * cache.block_size) if blocks else None
        self.renderer = PromptRenderer(llm.get_tokenizer(), self.max_model_len)
        self._exits = _ExitWatch(children)
        self.driver = EngineDriver(llm.llm_engine, on_finished=on_finished)
        # The kernel may exit (or the session be dropped) with the engine running: shut it down then.
        self._finalizer = weakref.finalize(self, _shutdown_engine, self.driver, llm)
        self._finalizer.atexit = False  # the exit hook below runs earlier than atexit would
        _RUNNING.add(self)

    # ----- starting --------------------------------------------------------------------------------
    @staticmethod
    def validate(config: EngineConfig, log: EngineLog) -> None:
        """Raise :class:`ConfigError` for a configuration vLLM refuses, without starting anything."""
        from ..compat import EngineArgs

        try:
            args = EngineArgs(**config.llm_kwargs())
            with log.capture(log.verbose):
                args.create_engine_config()
        except Exception as exc:
            raise ConfigError(short_reason(exc)) from None

    @classmethod
    def start(cls, config: EngineConfig, log: EngineLog, *, verbose: bool,
              progress: Callable[[str, float], None] | None,
              on_finished: Callable[[RequestHandle], None]) -> "LocalBackend":
        """Start an engine for ``config``; on any failure or interrupt, nothing it started is left.

        Raises :class:`EngineStartError` with vLLM's root cause, or ``KeyboardInterrupt``.
        """
        import psutil

        offset = log.size()
        log.mark(f"loading {config.model} {json.dumps(config.engine_kwargs, default=str)}")
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        memory_before = device_memory_used(config.platform)
        t0 = time.perf_counter()
        # Sized for a shared GPU; a start that cannot fit is refused here, in one line.
        plan = plan_gpu_memory(config, log)
        sized = plan.engine_kwargs() if plan is not None else {}
        interrupted = _InterruptRecorder()
        llm = None
        try:
            # The engine's processes leave the kernel's process group (an interrupt stops a request,
            # not the engine) and exit when the kernel dies: see engine.processes.
            from ..compat import interrupts_reach_engine_start

            with interrupted, log.follow(progress), log.capture(verbose), engine_processes_guarded(), \
                    interrupts_reach_engine_start(), thread_binding_for_start(config):
                from ..compat import LLM

                llm = LLM(**{**config.llm_kwargs(), **sized})
                # vLLM (re)configures its logger while the engine starts: take it over afterwards.
                log.route_python_logger(verbose)
                log.route_library_warnings()
            if interrupted.seen:  # vLLM swallowed the interrupt: the user still asked to stop
                raise KeyboardInterrupt
        except BaseException as exc:
            # Interrupted or failed half-way: whatever was started is shut down, nothing half-started stays.
            if isinstance(exc, KeyboardInterrupt) or interrupted.seen:
                log.mark(f"the start of {config.model} was interrupted ({short_reason(exc)})")
            if llm is not None:
                _shutdown_llm(llm)
                llm = None
            end_processes(_engine_processes(before), ask=True, grace=10.0)
            gc.collect()
            if isinstance(exc, KeyboardInterrupt) or interrupted.seen:
                # vLLM turns an interrupt inside some of its context managers into other errors.
                raise KeyboardInterrupt from None
            if _BOOTSTRAP_ERROR in log.text_since(offset):
                raise EngineStartError(_SCRIPT_NEEDS_MAIN_GUARD) from None
            reasons = log.errors_since(offset)
            message = short_reason(exc)
            no_room = memory_error_line(config, " ".join([message, *reasons]), plan)
            if no_room is not None:
                raise DoesNotFit(no_room + "; %vllm_log shows vLLM's full log") from None
            detail = "\n".join(r for r in reasons if r not in message)
            raise EngineStartError(
                f"vLLM could not start {config.model}: {message}" + (f"\n{detail}" if detail else "")
                + "\nThe session is empty; %vllm_log shows vLLM's full log.") from None
        return cls(llm, config, _engine_processes(before), time.perf_counter() - t0, memory_before, on_finished,
                   plan)

    # ----- requests --------------------------------------------------------------------------------
    @property
    def vllm_version(self) -> str:
        from ..compat import vllm_version

        return vllm_version()

    def _params(self, defaults: Any, overrides: dict[str, Any], structured: dict[str, Any]) -> Any:
        return build_sampling_params(defaults, overrides, **structured)

    def _given_params(self, sampling: Any) -> Any:
        from ..compat import RequestOutputKind

        sampling = sampling.clone()
        sampling.output_kind = RequestOutputKind.DELTA
        return sampling

    def render(self, prompts: list[PromptLike], raw: bool, system: str,
               template: dict[str, Any] | None = None) -> list[Prepared]:
        return self.renderer.prepare(prompts, raw, system, template)

    def _fit(self, params: Any, prompt_tokens: int) -> Any:
        return self.renderer.fit(params, prompt_tokens)

    @property
    def tokenizer(self) -> Any:
        return self.renderer.tokenizer

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.renderer.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    def thinking_budget_refusal(self) -> str | None:
        from ..compat import has_thinking_budget

        if not has_thinking_budget():
            return f"vLLM {self.vllm_version} has no thinking token budget"
        if not self._reasoning_config:  # only vLLM's reasoning config knows where thinking ends
            return ("it needs an engine started with vLLM's reasoning config: "
                    "%vllm_load MODEL --reasoning-config '{\"reasoning_parser\": \"NAME\"}'")
        return None

    def add(self, requests: list[tuple[RequestHandle, ReadyRequest]]) -> None:
        from ..compat import tokens_prompt

        self.driver.add([(handle, tokens_prompt(ready.prompt.token_ids), ready.params, ready.lora)
                         for handle, ready in requests])

    # ----- LoRA adapters ---------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, Adapter]:
        return dict(self._adapters)

    def _engine_lora(self, adapter: Adapter) -> Any:
        from ..compat import LoRARequest

        return LoRARequest(adapter.name, adapter.engine_id, adapter.path)

    def add_adapter(self, name: str, path: str, *, any_base: bool = False) -> Adapter:
        refusal = self.lora_refusal()
        if refusal is not None:
            raise AdapterError(refusal)
        adapter = read_adapter(name, path)
        known = self._adapters.get(adapter.name)
        if known is not None and known.path == adapter.path:
            return known
        names = (self.config.model, self.config.files, *_names(self._served_name))
        check_fits(adapter, max_rank=self.max_lora_rank, model=self.config.short_name, model_names=names,
                   hidden_size=self._hidden_size, any_base=any_base)
        # A new number each time: vLLM caches adapters by number, and a name may be given a new path.
        number = max([a.engine_id for a in self._adapters.values()], default=0) + 1
        from dataclasses import replace

        adapter = replace(adapter, engine_id=number)
        request = self._engine_lora(adapter)
        try:  # loaded now: a broken adapter is refused here and the engine keeps serving
            self.call(lambda llm: llm.llm_engine.add_lora(request))
        except Exception as exc:
            raise AdapterError(f"vLLM could not load adapter {adapter.name} from {adapter.path}: "
                               f"{short_reason(exc)}") from None
        if known is not None:
            self._forget(known)
        self._adapters[adapter.name] = adapter
        return adapter

    def remove_adapter(self, name: str) -> Adapter:
        adapter = self._adapters.get(name)
        if adapter is None:
            raise unknown_adapter(name, sorted(self._adapters))
        self._forget(adapter)
        del self._adapters[name]
        return adapter

    def _forget(self, adapter: Adapter) -> None:
        try:
            self.call(lambda llm: llm.llm_engine.remove_lora(adapter.engine_id))
        except Exception:  # requests already running with it finish with it; nothing else holds it
            pass

    def abort(self, request_ids: list[str]) -> None:
        self.driver.abort(request_ids)

    def abort_all(self) -> int:
        return self.driver.abort_all()

    @property
    def live_count(self) -> int:
        return self.driver.live_count

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM`` (its engine is driven by the driver thread: step it only through :meth:`call`)."""
        return self._llm

    def call(self, fn: Callable[[Any], Any]) -> Any:
        llm = self._llm
        return self.driver.call(lambda _engine: fn(llm))

    # ----- health and memory -----------------------------------------------------------------------
    def death(self) -> str | None:
        """Why this engine cannot serve any more (its driver failed or a process exited), or None."""
        if self.driver.dead is None and not self._processes_alive():
            self.driver.dead = RuntimeError("an engine process exited")
        return None if self.driver.dead is None else str(self.driver.dead)

    def _processes_alive(self) -> bool:
        return self._exits.all_running()

    def memory(self) -> tuple[int | None, str]:
        if self.config.platform == "cuda":
            # The engine's own processes: what the kernel itself holds (the user's tensors) is not the engine's.
            return gpu_memory_of(sorted(self.children) or [os.getpid()]), "GPU memory of the engine's processes"
        return self.host_memory() or 0, "RSS of engine processes"

    def host_memory(self) -> int | None:
        import psutil

        total = 0
        for pid in self.children:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total or None

    # ----- sleep mode ------------------------------------------------------------------------------
    @property
    def sleep_mode(self) -> bool:
        """Whether the engine was started with vLLM's sleep mode (the session's default on CUDA)."""
        return bool(self.config.engine_kwargs.get("enable_sleep_mode"))

    def sleep_refusal(self, level: int) -> str | None:
        if level not in (1, 2):
            return f"the sleep level is 1 (weights to host RAM) or 2 (weights discarded), not {level}"
        if self.config.platform != "cuda":
            return f"sleep mode needs an NVIDIA GPU (vLLM's sleep mode), and this engine runs on {self.config.platform}"
        if not self.sleep_mode:
            return ("this engine was loaded without sleep mode (--no-enable-sleep-mode): load it with "
                    "--enable-sleep-mode to put it to sleep, or %vllm_unload to free its memory")
        if level == 2 and not self.weights_reloadable:
            return ("level 2 discards the weights, and dummy weights (--load-format dummy) cannot be loaded "
                    "again: use level 1")
        return None

    @property
    def weights_reloadable(self) -> bool:
        """Whether the weights can be read again after a level-2 sleep (not for dummy weights)."""
        return self.config.engine_kwargs.get("load_format") != "dummy"

    def weight_bytes(self) -> int | None:
        return estimate_weight_bytes(self.config.files, self.config.engine_kwargs.get("load_format"), self.dtype)

    def sleep(self, level: int = 1) -> SleepReport:
        reason = self.sleep_refusal(level)
        if reason is not None:
            raise SleepError(reason)
        if self.asleep is not None:
            if self.asleep.level >= level:
                return self.asleep
            self.wake()  # level 1 -> 2: vLLM sleeps from awake only
        from ..compat import sleep_engine

        self.driver.abort_all()
        before = device_memory_used(self.config.platform)
        t0 = time.perf_counter()
        self.call(lambda llm: sleep_engine(llm, level))
        seconds = time.perf_counter() - t0
        self.asleep = SleepReport(self.config.model, level, seconds, before,
                                  device_memory_used(self.config.platform), time.monotonic())
        return self.asleep

    def wake(self) -> float:
        report = self.asleep
        if report is None:
            return 0.0
        from ..compat import reload_weights, wake_engine

        t0 = time.perf_counter()
        if report.level == 2:
            def wake_and_reload(llm: Any) -> None:
                # Weights first and loaded before the KV cache comes back: the peak stays that of the
                # running engine (vLLM's recipe for level 2).
                wake_engine(llm, ["weights"])
                reload_weights(llm)
                wake_engine(llm, ["kv_cache"])
            self.call(wake_and_reload)
        else:
            self.call(lambda llm: wake_engine(llm))
        self.asleep = None
        return time.perf_counter() - t0

    # ----- stopping --------------------------------------------------------------------------------
    def shutdown(self, baseline: Any = "own") -> UnloadReport:
        """Stop the driver and the engine, end its processes and wait for device memory to return
        to ``baseline`` (bytes in use; by default what was in use before this engine loaded; None:
        do not wait, another engine's shutdown waits for both)."""
        _RUNNING.discard(self)
        self._exits.close()
        self._finalizer()  # stops the driver and the engine core; a second call does nothing
        self._llm = None
        self.renderer = None  # type: ignore[assignment]
        gc.collect()
        _empty_device_cache()
        killed = end_processes(self.children, ask=False, grace=15.0)  # shutdown already asked them
        if baseline == "own":
            baseline = self.memory_before_load
        after = (_wait_for_device_memory(self.config.platform, baseline) if baseline is not None
                 else device_memory_used(self.config.platform))
        return UnloadReport(self.config.model, len(self.children), killed, baseline, after)


# ----- helpers ------------------------------------------------------------------------------------

def _names(served: Any) -> tuple[str, ...]:
    """vLLM's ``served_model_name`` (a name, a list of names, or None) as a tuple."""
    if not served:
        return ()
    return (served,) if isinstance(served, str) else tuple(served)


def short_reason(exc: BaseException) -> str:
    """The innermost message of an exception chain, on one or two lines."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    for candidate in reversed(seen):
        text = str(candidate).strip()
        if text:
            lines = [line for line in text.splitlines() if line.strip()]
            return f"{type(candidate).__name__}: " + " ".join(lines[:3])[:600]
    return type(seen[0]).__name__ if seen else "unknown error"


class _InterruptRecorder:
    """Notes whether SIGINT arrived while the block ran (main thread only; elsewhere a no-op).

    The interrupt is still raised as usual; this only remembers it, because vLLM's start-up code
    can swallow the KeyboardInterrupt or turn it into another error.
    """

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None

    def __enter__(self) -> "_InterruptRecorder":
        import signal

        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if callable(previous):
                def record(signum: int, frame: Any) -> Any:
                    self.seen = True
                    return previous(signum, frame)

                self._previous = previous
                signal.signal(signal.SIGINT, record)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class _ExitWatch:
    """Whether processes are still running, asked before every request: so it must be cheap.

    On Linux a pidfd per process turns readable when the process exits (a zombie counts), and a
    zero-timeout ``select`` answers in a microsecond or two, from any thread; elsewhere psutil
    reads each process's state (tens of microseconds each).
    """

    def __init__(self, pids: set[int]) -> None:
        self.pids = set(pids)
        self._fds: list[int] = []
        self._watching = False
        if hasattr(os, "pidfd_open"):
            try:
                for pid in self.pids:
                    self._fds.append(os.pidfd_open(pid))
            except OSError:  # a process already gone, or no pidfd support in this kernel
                self.close()
            else:
                self._watching = True

    def all_running(self) -> bool:
        if self._watching:
            try:
                readable, _, _ = select.select(self._fds, [], [], 0)
            except (OSError, ValueError):  # closed meanwhile: the engine is being shut down
                return False
            return not readable
        import psutil

        for pid in self.pids:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                return False
        return True

    def close(self) -> None:
        self._watching = False
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def _shutdown_llm(llm: Any) -> None:
    from ..compat import shutdown_engine

    try:
        shutdown_engine(llm)
    except Exception:
        pass


def _shutdown_engine(driver: EngineDriver, llm: Any) -> None:
    driver.stop(timeout=5)
    _shutdown_llm(llm)


def _empty_device_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def _engine_processes(before: set[int]) -> set[int]:
    """Child processes that appeared since ``before``, except multiprocessing's resource tracker
    (it serves the whole kernel and outlives every engine)."""
    import psutil

    pids = set()
    for proc in psutil.Process().children(recursive=True):
        if proc.pid in before:
            continue
        try:
            if "resource_tracker" in " ".join(proc.cmdline()):
                continue
        except psutil.Error:
            continue
        pids.add(proc.pid)
    return pids


def _wait_for_device_memory(platform: str, baseline: int | None, timeout: float = 15.0) -> int | None:
    """Device memory in use after an unload, waiting a little for the driver to release it."""
    used = device_memory_used(platform)
    deadline = time.monotonic() + timeout
    while used is not None and baseline is not None and used > baseline + UnloadReport.SLACK \
            and time.monotonic() < deadline:
        time.sleep(0.5)
        gc.collect()
        used = device_memory_used(platform)
    return used


# Engines still running; shut down at interpreter exit.
_RUNNING: "weakref.WeakSet[LocalBackend]" = weakref.WeakSet()


def _shutdown_running() -> None:
    for backend in list(_RUNNING):
        try:
            backend.shutdown()
        except Exception:
            pass


at_exit(_shutdown_running)
