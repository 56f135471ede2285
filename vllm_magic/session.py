"""The kernel's one live vLLM engine, shared by every front-end.

``get_session()`` returns the process-wide :class:`EngineSession`. ``load()`` is idempotent: the same
resolved configuration returns the running engine at once; another one shuts the old engine down,
checks that its memory came back, then starts the new one. ``submit()`` accepts many prompts or
conversations at once and returns :class:`~vllm_magic.handles.RequestHandle` objects; one driver
thread owns the engine, so callers on any thread or event loop are batched together by vLLM's
scheduler.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import json
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .engine_config import ConfigError, EngineConfig, import_vllm, resolve_engine_config, unpinned_cpu_threads
from .engine_log import EngineLog, quiet_vllm_environment
from .engine_processes import end_processes, engine_processes_guarded
from .handles import EngineDiedError, GenerationResult, RequestHandle
from .sampling import SamplingDefaults, build_sampling_params

__all__ = [
    "EngineSession", "get_session", "LoadInfo", "SessionStatus", "NoEngineError", "EngineStartError",
    "PromptTooLongError", "ConfigError", "EngineDiedError", "UnloadReport",
]

Message = dict[str, str]
PromptLike = str | Sequence[Message]


class NoEngineError(RuntimeError):
    """No engine is loaded."""


class EngineStartError(RuntimeError):
    """The engine failed to start; the message carries vLLM's root cause in a few lines."""


# multiprocessing's words when a spawned process re-imports a script that starts processes at import.
_BOOTSTRAP_ERROR = "finished its bootstrapping phase"
_SCRIPT_NEEDS_MAIN_GUARD = (
    "vLLM could not start its engine: this script loads the model when it is imported. vLLM starts "
    "its engine in a new Python process (the 'spawn' method, the only one on CPU and the safe one "
    "with CUDA), which imports the script again, so that process tried to start an engine of its "
    "own. Put the code that loads the model under `if __name__ == \"__main__\":` (raw vLLM needs "
    "the same); notebooks and the IPython shell need nothing.")


class PromptTooLongError(ValueError):
    """A prompt does not fit the model's context window."""


@dataclass
class LoadInfo:
    """What ``load()`` did."""

    config: EngineConfig
    already_loaded: bool
    seconds: float
    summary: str


@dataclass
class SessionStatus:
    """A snapshot of the session, as ``%vllm_status`` shows it."""

    loaded: bool
    model: str | None = None
    platform: str | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    memory_bytes: int | None = None
    memory_kind: str | None = None
    uptime: float | None = None
    load_seconds: float | None = None
    submissions: int = 0
    requests_served: int = 0
    tokens_out: int = 0
    requests_live: int = 0
    vllm_version: str | None = None
    fingerprint: str | None = None
    log_path: str | None = None
    #: Why the loaded engine cannot serve any more (its process died), or None while it is healthy.
    dead: str | None = None

    def _repr_markdown_(self) -> str:
        if not self.loaded:
            return "**vllm-magic**: no engine loaded. Run `%vllm_load` (demo model) or `%vllm_load MODEL`."
        if self.dead:
            return (f"**vllm-magic**: the engine of `{self.model}` is dead ({self.dead}). "
                    "Run `%vllm_load` to start it again; `%vllm_log` shows why it died.")
        mem = "n/a" if self.memory_bytes is None else f"{self.memory_bytes / 2**30:.2f} GiB ({self.memory_kind})"
        rows = [
            ("model", f"`{self.model}`"), ("platform", self.platform), ("vLLM", self.vllm_version),
            ("dtype", self.dtype), ("max model len", self.max_model_len),
            ("KV cache", f"{self.kv_cache_tokens} tokens" if self.kv_cache_tokens else "n/a"),
            ("memory", mem), ("uptime", f"{self.uptime:.0f} s"), ("load time", f"{self.load_seconds:.1f} s"),
            ("requests served", self.requests_served), ("tokens out", self.tokens_out),
            ("requests running", self.requests_live),
            ("engine args", ", ".join(f"{k}={v}" for k, v in sorted(self.engine_args.items())) or "-"),
        ]
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)

    def __repr__(self) -> str:
        if not self.loaded:
            return "SessionStatus(loaded=False)"
        if self.dead:
            return f"SessionStatus(model={self.model!r}, dead={self.dead!r})"
        return (f"SessionStatus(model={self.model!r}, platform={self.platform!r}, requests_served="
                f"{self.requests_served}, tokens_out={self.tokens_out})")


@dataclass
class UnloadReport:
    """What the last ``unload()`` left behind: engine processes and device memory."""

    model: str
    processes: int
    processes_killed: int
    device_memory_before_load: int | None
    device_memory_after_unload: int | None

    @property
    def device_memory_returned(self) -> bool | None:
        if self.device_memory_before_load is None or self.device_memory_after_unload is None:
            return None
        return self.device_memory_after_unload <= self.device_memory_before_load + _MEMORY_SLACK


_MEMORY_SLACK = 256 << 20  # allocator and driver bookkeeping that is not the engine's


class _Engine:
    """What exists while an engine is loaded."""

    def __init__(self, llm: Any, config: EngineConfig, driver: Any, children: set[int], load_seconds: float,
                 memory_before_load: int | None):
        self.llm = llm
        self.memory_before_load = memory_before_load
        self.config = config
        self.driver = driver
        self.children = children
        self.load_seconds = load_seconds
        self.started = time.monotonic()
        self.tokenizer = llm.get_tokenizer()
        model_config = llm.llm_engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.dtype = str(model_config.dtype).replace("torch.", "")
        cache = llm.llm_engine.vllm_config.cache_config
        blocks = getattr(cache, "num_gpu_blocks", None)
        self.kv_cache_tokens = int(blocks * cache.block_size) if blocks else None
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def death(self) -> BaseException | None:
        """Why this engine cannot serve any more (its driver failed or a process exited), or None."""
        if self.driver.dead is None and not self.processes_alive():
            self.driver.dead = RuntimeError("an engine process exited")
        return self.driver.dead

    def processes_alive(self) -> bool:
        """Whether every engine process is still running (a killed engine otherwise hangs requests)."""
        import psutil

        for pid in self.children:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                return False
        return True


class EngineSession:
    """Owns at most one vLLM engine and serves every front-end from it."""

    def __init__(self, log: EngineLog | None = None) -> None:
        self.defaults = SamplingDefaults()
        self._log = log
        self._engine: _Engine | None = None
        self._lock = threading.RLock()  # serializes load/unload; submit only reads _engine
        self._ids = itertools.count(1)
        self._counter_lock = threading.Lock()
        self.submissions = 0
        self.requests_served = 0
        self.tokens_out = 0
        self.engines_created = 0
        self.last_result: GenerationResult | None = None
        self.last_unload: UnloadReport | None = None
        self._listeners: list[Callable[[GenerationResult], None]] = []
        weakref.finalize(self, _shutdown_engine_of, self._engine_box())

    # ----- lifecycle -----------------------------------------------------------------------------
    @property
    def log(self) -> EngineLog:
        if self._log is None:
            self._log = EngineLog()
        return self._log

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    @property
    def config(self) -> EngineConfig | None:
        return None if self._engine is None else self._engine.config

    @property
    def llm(self) -> Any:
        """The underlying ``vllm.LLM`` (its engine is driven by the session's thread: don't step it)."""
        return self._require().llm

    def load(self, model: str | None = None, *, verbose: bool = False,
             progress: Callable[[str, float], None] | None = None, **engine_kwargs: Any) -> LoadInfo:
        """Load ``model`` (None: the demo model) with vLLM engine arguments, or reuse the live engine.

        Raises :class:`ConfigError` (old engine kept) for a configuration that is invalid before
        anything starts, and :class:`EngineStartError` (session left empty) when vLLM fails to start.
        ``progress(stage, elapsed)`` is called about twice a second while a new engine starts.
        """
        start = time.perf_counter()
        quiet_vllm_environment(verbose)  # before any vLLM import and any engine's children start
        import_vllm(verbose)
        config = resolve_engine_config(model, **engine_kwargs)
        with self._lock:
            current = self._engine
            if (current is not None and current.config.fingerprint == config.fingerprint
                    and current.death() is None):
                return LoadInfo(config, True, time.perf_counter() - start, self._summary(current, already=True))
            if current is not None:
                self._validate(config)  # refuse a bad new configuration while the old engine still runs
                self.unload()
            self._engine = self._start(config, verbose, progress)
            return LoadInfo(config, False, time.perf_counter() - start, self._summary(self._engine))

    def _validate(self, config: EngineConfig) -> None:
        from vllm.engine.arg_utils import EngineArgs

        try:
            args = EngineArgs(**config.llm_kwargs())
            with self.log.capture(self.log.verbose):
                args.create_engine_config()
        except Exception as exc:
            raise ConfigError(_short_reason(exc)) from None

    def _start(self, config: EngineConfig, verbose: bool, progress: Callable[[str, float], None] | None) -> _Engine:
        import psutil

        log = self.log
        offset = log.size()
        log.mark(f"loading {config.model} {json.dumps(config.engine_kwargs, default=str)}")
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        memory_before = _device_memory_used(config.platform)
        if config.platform == "cpu":
            unpinned_cpu_threads()
        t0 = time.perf_counter()
        interrupted = _InterruptRecorder()
        llm = None
        try:
            # The engine's processes leave the kernel's process group (an interrupt stops a request,
            # not the engine) and exit when the kernel dies: see engine_processes.
            with interrupted, log.follow(progress), log.capture(verbose), engine_processes_guarded():
                from vllm import LLM

                llm = LLM(**config.llm_kwargs())
                # vLLM (re)configures its logger while the engine starts: take it over afterwards.
                log.route_python_logger(verbose)
            if interrupted.seen:  # vLLM swallowed the interrupt: the user still asked to stop
                raise KeyboardInterrupt
        except BaseException as exc:
            # Interrupted or failed half-way: whatever was started is shut down, nothing half-started stays.
            if llm is not None:
                _shutdown(llm)
                llm = None
            end_processes(_engine_processes(before), ask=True, grace=10.0)
            gc.collect()
            if isinstance(exc, KeyboardInterrupt) or interrupted.seen:
                # vLLM turns an interrupt inside some of its context managers into other errors.
                raise KeyboardInterrupt from None
            if _BOOTSTRAP_ERROR in log.text_since(offset):
                raise EngineStartError(_SCRIPT_NEEDS_MAIN_GUARD) from None
            reasons = log.errors_since(offset)
            message = _short_reason(exc)
            detail = "\n".join(r for r in reasons if r not in message)
            raise EngineStartError(
                f"vLLM could not start {config.model}: {message}" + (f"\n{detail}" if detail else "")
                + "\nThe session is empty; %vllm_log shows vLLM's full log.") from None
        children = _engine_processes(before)
        self.engines_created += 1
        from .driver import EngineDriver

        driver = EngineDriver(llm.llm_engine, on_finished=self._count)
        engine = _Engine(llm, config, driver, children, time.perf_counter() - t0, memory_before)
        self._box[0] = engine
        return engine

    def unload(self) -> bool:
        """Shut the engine down and wait until its processes (and GPU memory) are gone.

        Returns False when nothing was loaded. Safe to call twice.
        """
        with self._lock:
            engine, self._engine = self._engine, None
            self._box[0] = None
            if engine is None:
                return False
            self.log.mark(f"unloading {engine.config.model}")
            engine.driver.stop()
            _shutdown(engine.llm)
            llm = engine.llm
            engine.llm = None
            del llm
            gc.collect()
            _empty_device_cache()
            killed = end_processes(engine.children, ask=False, grace=15.0)  # shutdown already asked them
            if killed:
                self.log.mark(f"killed {killed} engine process(es) that outlived shutdown")
            after = _wait_for_device_memory(engine.config.platform, engine.memory_before_load)
            self.last_unload = UnloadReport(engine.config.model, len(engine.children), killed,
                                            engine.memory_before_load, after)
            return True

    def _engine_box(self) -> list:
        self._box: list = [None]
        return self._box

    # ----- requests ------------------------------------------------------------------------------
    def submit(self, prompts: PromptLike | Sequence[PromptLike], sampling: Any = None, *,
               raw: bool | None = None, system: str | None = None, json_schema: Any = None,
               regex: str | None = None, choice: list[str] | None = None,
               **overrides: Any) -> list[RequestHandle]:
        """Submit one or many prompts together; returns one handle per prompt.

        ``prompts`` is a string, a conversation (a list of ``{"role", "content"}`` dicts), or a list
        of either. Strings go through the model's chat template as one user message (with
        ``system`` or the defaults' system prompt) unless ``raw`` is true. ``sampling`` is a
        ``SamplingParams`` used as given, or None to build one from the session defaults and
        ``overrides`` (``temperature=0``, ``max_tokens=5``, ``n=2``, ...).
        """
        engine = self._require()
        items = _as_prompt_list(prompts)
        raw = self.defaults.raw if raw is None else raw
        system = self.defaults.system_prompt if system is None else system
        if sampling is None:
            sampling = build_sampling_params(self.defaults, overrides, json_schema=json_schema,
                                             regex=regex, choice=choice)
        elif overrides or json_schema is not None or regex is not None or choice is not None:
            raise TypeError("pass either a SamplingParams or sampling keyword arguments, not both")
        else:
            from .compat import RequestOutputKind

            sampling = sampling.clone()
            sampling.output_kind = RequestOutputKind.DELTA
        parse = json.loads if json_schema is not None else None
        prepared = self._prepare(engine, items, raw, system)
        from .compat import tokens_prompt

        handles, batch = [], []
        for text, token_ids in prepared:
            params = _fit_params(sampling, len(token_ids), engine.max_model_len)
            request_id = f"vm-{next(self._ids)}"
            handle = RequestHandle(request_id, text, token_ids, params.n, self._abort_one, parse)
            batch.append((handle, tokens_prompt(token_ids), params))
            handles.append(handle)
        engine.driver.add(batch)
        with self._counter_lock:
            self.submissions += 1
        return handles

    def generate(self, prompt: PromptLike, **kwargs: Any) -> GenerationResult:
        """Submit one prompt and wait for its result (Ctrl-C aborts it)."""
        return self.submit(prompt, **kwargs)[0].result()

    def render_prompt(self, prompt: PromptLike, *, raw: bool | None = None, system: str | None = None) -> str:
        """The exact text that would be sent for ``prompt`` (after the chat template)."""
        engine = self._require()
        raw = self.defaults.raw if raw is None else raw
        system = self.defaults.system_prompt if system is None else system
        return self._prepare(engine, [prompt], raw, system)[0][0]

    def _prepare(self, engine: _Engine, items: list[PromptLike], raw: bool,
                 system: str) -> list[tuple[str, list[int]]]:
        """``(text, token_ids)`` of every prompt: templates rendered and texts tokenized in batches
        (one tokenizer call for a whole ``---`` batch instead of one per prompt)."""
        tokenizer = engine.tokenizer
        texts: list[str | None] = [None] * len(items)
        special: list[bool] = [True] * len(items)  # whether encode adds the model's special tokens
        chats: list[tuple[int, list[dict]]] = []
        for i, item in enumerate(items):
            if isinstance(item, str) and raw:
                texts[i] = item
                continue
            messages = [{"role": "user", "content": item}] if isinstance(item, str) else [dict(m) for m in item]
            if system and not any(m.get("role") == "system" for m in messages):
                messages.insert(0, {"role": "system", "content": system})
            if engine.has_chat_template:
                chats.append((i, messages))
                special[i] = False  # the template already holds them
            else:  # a base model without a template: the contents as plain text
                texts[i] = "\n\n".join(m["content"] for m in messages)
        if chats:
            rendered = _render_chats(tokenizer, [messages for _, messages in chats])
            for (i, _), text in zip(chats, rendered):
                texts[i] = text
        token_lists: list[list[int] | None] = [None] * len(items)
        for flag in (True, False):
            group = [i for i in range(len(items)) if special[i] is flag]
            if group:
                encoded = _encode_texts(tokenizer, [texts[i] for i in group], flag)
                for i, ids in zip(group, encoded):
                    token_lists[i] = ids
        for token_ids in token_lists:
            if len(token_ids) >= engine.max_model_len:
                raise PromptTooLongError(
                    f"the prompt has {len(token_ids)} tokens but the model's context holds {engine.max_model_len} "
                    f"(prompt plus answer); shorten it or load with a larger --max-model-len")
        return list(zip(texts, token_lists))

    def abort_all(self) -> int:
        """Abort every request in flight (the Stop button); returns how many were stopped."""
        engine = self._engine
        return 0 if engine is None else engine.driver.abort_all()

    def _abort_one(self, request_id: str) -> None:
        engine = self._engine
        if engine is not None:
            engine.driver.abort([request_id])

    def run_on_engine(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(llm)`` on the driver thread, between engine steps (benchmarks use raw vLLM here)."""
        engine = self._require()
        return engine.driver.call(lambda _engine: fn(engine.llm))

    def add_listener(self, fn: Callable[[GenerationResult], None]) -> None:
        """Call ``fn(result)`` after every finished request (the widgets' status line)."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[GenerationResult], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def _count(self, handle: RequestHandle) -> None:
        result = handle.snapshot()
        with self._counter_lock:
            self.requests_served += 1
            self.tokens_out += result.output_tokens
        self.last_result = result
        for fn in list(self._listeners):
            try:
                fn(result)
            except Exception:
                pass

    def _require(self) -> _Engine:
        engine = self._engine
        if engine is None:
            raise NoEngineError("no model is loaded: run %vllm_load (the demo model) or %vllm_load MODEL first")
        death = engine.death()
        if death is not None:
            raise EngineDiedError(f"the engine process died ({death}); run %vllm_load again to restart it")
        return engine

    # ----- status --------------------------------------------------------------------------------
    def status(self) -> SessionStatus:
        """Model, engine args, platform, memory, uptime and request counters."""
        engine = self._engine
        if engine is None:
            return SessionStatus(loaded=False, submissions=self.submissions, requests_served=self.requests_served,
                                 tokens_out=self.tokens_out)
        from .compat import vllm_version

        death = engine.death()
        dead = None if death is None else str(death)
        memory, kind = (None, "") if dead else _engine_memory(engine)
        return SessionStatus(
            loaded=True, model=engine.config.model, platform=engine.config.platform,
            engine_args=dict(engine.config.engine_kwargs), dtype=engine.dtype, max_model_len=engine.max_model_len,
            kv_cache_tokens=engine.kv_cache_tokens, memory_bytes=memory, memory_kind=kind,
            uptime=time.monotonic() - engine.started, load_seconds=engine.load_seconds,
            submissions=self.submissions, requests_served=self.requests_served, tokens_out=self.tokens_out,
            requests_live=engine.driver.live_count, vllm_version=vllm_version(),
            fingerprint=engine.config.fingerprint, log_path=str(self.log.path), dead=dead)

    def _summary(self, engine: _Engine, already: bool = False) -> str:
        name = os.path.basename(engine.config.model.rstrip("/")) or engine.config.model
        if already:
            return f"{name} already loaded ({engine.config.platform}, {engine.dtype})"
        kv = f", KV cache {engine.kv_cache_tokens:,} tokens" if engine.kv_cache_tokens else ""
        return f"{name} loaded on {engine.config.platform} ({engine.dtype}{kv}) in {engine.load_seconds:.1f} s"


# ----- helpers ------------------------------------------------------------------------------------

def _as_prompt_list(prompts: Any) -> list[PromptLike]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], dict):
        return [prompts]  # one conversation
    if not prompts:
        raise ValueError("no prompts given")
    return prompts


def _is_hf_tokenizer(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is a Hugging Face tokenizer (whose calls take lists); vLLM's other
    tokenizers (Mistral's, custom ones) are used one text at a time."""
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - vLLM depends on transformers
        return False
    return isinstance(tokenizer, PreTrainedTokenizerBase)


def _render_chats(tokenizer: Any, conversations: list[list[dict]]) -> list[str]:
    """The chat-templated text of each conversation, in one template call where the tokenizer
    takes a batch; identical to rendering them one by one."""
    def one(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    if len(conversations) > 1 and _is_hf_tokenizer(tokenizer):
        try:
            rendered = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - one by one below reports the failing conversation's error
            rendered = None
        if isinstance(rendered, list) and len(rendered) == len(conversations) and all(isinstance(t, str) for t in rendered):
            return rendered
    return [one(messages) for messages in conversations]


def _encode_texts(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each text, in one batched tokenizer call where the tokenizer supports it
    (the Rust tokenizer then encodes them together); identical to ``encode`` one by one."""
    if len(texts) > 1 and _is_hf_tokenizer(tokenizer):
        try:
            encoded = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        except Exception:  # noqa: BLE001 - fall back to the per-text path, which reports real errors
            encoded = None
        if encoded is not None and len(encoded) == len(texts):
            return [list(ids) for ids in encoded]
    if add_special_tokens:  # the plain call, exactly as before batching
        return [list(tokenizer.encode(text)) for text in texts]
    return [list(tokenizer.encode(text, add_special_tokens=False)) for text in texts]


def _fit_params(params: Any, prompt_len: int, max_model_len: int) -> Any:
    """Bound max_tokens by the room left in the context window."""
    room = max_model_len - prompt_len
    if params.max_tokens is None or params.max_tokens > room:
        params = params.clone()
        params.max_tokens = room
    return params


def _short_reason(exc: BaseException) -> str:
    """The innermost message of an exception chain, on one or two lines."""
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
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


def _shutdown(llm: Any) -> None:
    from .compat import shutdown_engine

    try:
        shutdown_engine(llm)
    except Exception:
        pass


def _shutdown_engine_of(box: list) -> None:
    engine = box[0]
    if engine is not None and engine.llm is not None:
        engine.driver.stop(timeout=5)
        _shutdown(engine.llm)


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


def _device_memory_used(platform: str) -> int | None:
    """Bytes in use on all NVIDIA GPUs, through NVML (creates no CUDA context), or None."""
    if platform != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return sum(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used
                       for i in range(pynvml.nvmlDeviceGetCount()))
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def _wait_for_device_memory(platform: str, baseline: int | None, timeout: float = 15.0) -> int | None:
    """Device memory in use after an unload, waiting a little for the driver to release it."""
    used = _device_memory_used(platform)
    deadline = time.monotonic() + timeout
    while used is not None and baseline is not None and used > baseline + _MEMORY_SLACK \
            and time.monotonic() < deadline:
        time.sleep(0.5)
        gc.collect()
        used = _device_memory_used(platform)
    return used


def _engine_memory(engine: _Engine) -> tuple[int | None, str]:
    if engine.config.platform == "cuda":
        used = _device_memory_used("cuda")
        return used, "GPU memory in use"
    import psutil

    total = 0
    for pid in engine.children:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total, "RSS of engine processes"


def _at_exit(fn: Callable[[], Any]) -> None:
    """Run ``fn`` when the interpreter exits, before it joins non-daemon threads.

    vLLM's client keeps non-daemon threads that end only when the engine shuts down, and Python joins
    those before plain ``atexit`` handlers run: a kernel would hang on exit. ``concurrent.futures``
    uses the same hook for the same reason.
    """
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(fn)
            return
        except RuntimeError:  # already shutting down
            pass
    atexit.register(fn)


_session: EngineSession | None = None
_session_lock = threading.Lock()


def get_session() -> EngineSession:
    """The process-wide engine session (created on first use, shut down at exit)."""
    global _session
    with _session_lock:
        if _session is None:
            _session = EngineSession()
            _at_exit(_session.unload)
        return _session
