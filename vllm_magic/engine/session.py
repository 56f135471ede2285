"""The kernel's one engine session, shared by every front-end.

``get_session()`` returns the process-wide :class:`EngineSession`. ``load()`` is idempotent by one
rule (:meth:`EngineConfig.serves`): a request the live engine serves returns at once; another one
shuts the old engine down, checks that its memory came back, then starts the new one. On a GPU,
``load(..., keep=True)`` puts the old engine to sleep instead (vLLM's sleep mode), and a later load
that one of the sleeping engines serves wakes it in seconds: one engine is awake at a time. ``submit()``
is the only way to generate: it takes many prompts or conversations at once, builds the sampling
parameters from the session's defaults plus the call's overrides, checks what holds for every
front-end (thinking switch and budget, one answer constraint, the session's parsers), and returns
:class:`~vllm_magic.engine.requests.handles.RequestHandle` objects to iterate, await or abort from any
thread or event loop. What runs the model is a :class:`~vllm_magic.engine.backends.base.Backend`;
front-ends talk to the session only.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
import weakref
from typing import Any, Callable, Literal, Sequence

from ..errors import (ConfigError, EngineDiedError, EngineStartError, NoEmbedderError, NoEngineError,
                      PromptTooLongError, RequestError, ServerError, SleepError)
from .backends.base import Backend, RequestOptions, SleepReport, UnloadReport
from .compat import import_vllm, version_line, version_too_old, vllm_version
from .config import EngineConfig, Parsers, resolve_engine_config
from .embeddings import NO_EMBEDDER, Embedder, check_embedding_config, embedding_config
from .listeners import Listeners
from .log import EngineLog, quiet_vllm_environment
from .requests.adapters import Adapter, adapter_names
from .requests.grid import GRID_LIMIT, Grid, check_grid_size, grid_settings
from .requests.handles import GenerationResult, RequestHandle
from .requests.prompts import PromptLike, as_prompt_list
from .requests.reasoning import ReasoningSplitter
from .requests.sampling import SamplingDefaults
from .status import GiB, KeptEngine, LoadInfo, SessionStatus, kept_engine, loaded_line, woken_line, gpu_line

__all__ = [
    "EngineSession", "get_session", "LoadInfo", "SessionStatus", "UnloadReport", "NoEngineError",
    "EngineStartError", "PromptTooLongError", "ConfigError", "EngineDiedError", "SleepError", "SleepReport",
    "KeptEngine",
]

#: Host RAM a level-1 sleep leaves free beside the weights it copies there.
HOST_RAM_MARGIN = 4 * GiB


class EngineSession:
    """Owns at most one awake engine (a :class:`Backend`) and serves every front-end from it; on a
    GPU it may also keep sleeping engines to switch back to (``load(..., keep=True)``)."""

    #: How many sleeping engines ``load(..., keep=True)`` keeps; the oldest beyond it is unloaded.
    max_kept = 2

    def __init__(self, log: EngineLog | None = None) -> None:
        self.defaults = SamplingDefaults()
        self._log = log
        self._backend: Backend | None = None
        self._kept: list[Backend] = []  # sleeping engines, most recent first
        self._lock = threading.RLock()  # serializes load/unload; submit only reads _backend
        self._ids = itertools.count(1)
        self._counter_lock = threading.Lock()
        self.submissions = 0
        self.requests_served = 0
        self.tokens_out = 0
        self.engines_created = 0
        self.last_result: GenerationResult | None = None
        self.last_unload: UnloadReport | None = None
        self.listeners = Listeners(report=lambda text: self.log.mark(text))
        #: The vLLM server this kernel started (``%vllm_serve``), or None.
        self.server: Any = None
        self._parsers = Parsers()

    # ----- lifecycle -----------------------------------------------------------------------------
    @property
    def log(self) -> EngineLog:
        """vLLM's log of this session's engines (``%vllm_log``)."""
        if self._log is None:
            self._log = EngineLog()
        return self._log

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    @property
    def config(self) -> EngineConfig | None:
        return None if self._backend is None else self._backend.config

    @property
    def backend(self) -> Backend | None:
        """What runs the model now (None when nothing is loaded); for tests and benchmarks:
        front-ends use the session's own methods."""
        return self._backend

    @property
    def url(self) -> str | None:
        """The URL of the vLLM server the session is attached to, or None (an engine in this
        kernel, or none)."""
        backend = self._backend
        return backend.url if backend is not None and backend.kind == "remote" else None

    @property
    def llm(self) -> Any:
        """The underlying ``vllm.LLM`` of an in-process engine (its engine is driven by the
        session's thread: don't step it; use :meth:`run_on_engine`)."""
        return self._require().llm

    @property
    def tokenizer(self) -> Any:
        """The loaded model's tokenizer in this process (vLLM's parsers read it)."""
        return self._require().tokenizer

    @property
    def parsers(self) -> Parsers:
        """vLLM's reasoning and tool call parsers for this session's answers (``%vllm_load ...
        --reasoning-parser NAME --tool-call-parser NAME``); they never restart the engine. Setting
        names that vLLM does not have raises :class:`ConfigError`, and the parsers stay as they were."""
        return self._parsers

    @parsers.setter
    def parsers(self, parsers: Parsers) -> None:
        self._parsers = parsers.check()

    def resolve(self, model: str | os.PathLike | None = None, **engine_kwargs: Any) -> EngineConfig:
        """The configuration ``load(model, **engine_kwargs)`` would run (nothing is started)."""
        import_vllm()
        return resolve_engine_config(model, **engine_kwargs)

    def _serves_name(self, model: str | os.PathLike) -> bool:
        """Whether the live engine runs ``model`` (by name): its files are here, whatever else differs."""
        backend = self._backend
        return backend is not None and backend.config.model == os.fspath(model)

    def serves(self, wanted: EngineConfig) -> bool:
        """Whether the live engine serves a load request for ``wanted`` (the rule ``load`` uses)."""
        backend = self._backend
        return (backend is not None and backend.death() is None
                and backend.config.serves(wanted, backend.derived_args))

    def load(self, model: str | os.PathLike | None = None, *, verbose: bool = False,
             progress: Callable[[str, float], None] | None = None, keep: bool = False,
             persist: bool = False, idle_timeout: float | None | Literal["default"] = "default",
             flag_words: Sequence[str] | None = None, **engine_kwargs: Any) -> LoadInfo:
        """Load ``model`` (None: the demo model) with vLLM engine arguments, or keep the live engine
        when it serves that request.

        A persisted engine of this user that serves the request (one that outlives its kernel) is
        attached to instead of starting one. ``persist=True`` starts such an engine when none
        serves: vLLM's server in a process of its own, reached over a private socket, that ends
        ``idle_timeout`` seconds (default 15 minutes; None: never) after the last kernel detached
        and the last request finished, or on :meth:`unload` with ``stop=True``. A persisted engine
        started by exactly this request is attached to before vLLM is even imported here
        (``flag_words``: the ``%vllm_load`` line's engine flags, recorded with the engine for that).

        A sleeping engine that serves the request (kept by ``keep=True``, or put to sleep with
        :meth:`sleep`) is woken instead of started. ``keep=True`` puts the engine loaded now to
        sleep instead of shutting it down (GPU only: :class:`SleepError` elsewhere, nothing
        changed); see :meth:`_keep` for what happens when host RAM is short.

        Raises :class:`ConfigError` (old engine kept) for a configuration that is invalid before
        anything starts, and :class:`EngineStartError` (session left empty, sleeping engines kept)
        when vLLM fails to start. ``progress(stage, elapsed)`` is called about twice a second while
        a new engine starts.
        """
        start = time.perf_counter()
        quiet_vllm_environment(verbose)  # before any vLLM import and any engine's children start
        from .backends.persisted import request_key

        request = request_key(model, engine_kwargs)
        if not keep:
            info = self._attach_started(start, progress, persist, idle_timeout, request=request)
            if info is not None:
                return info
        if model is not None and not self._serves_name(model):  # before vLLM's import: fails in seconds
            self.download(model, revision=engine_kwargs.get("revision"),
                          download_dir=engine_kwargs.get("download_dir"), progress=progress)
        import_vllm(verbose)
        installed = vllm_version()
        version = version_line(installed)
        if version_too_old(installed):
            raise ConfigError(version)
        config = resolve_engine_config(model, **engine_kwargs)
        with self._lock:
            if self.serves(config) and (not persist or self._backend.persisted is not None):
                backend = self._backend
                if persist and idle_timeout != "default":
                    backend.persisted.set_idle_timeout(idle_timeout)
                woke = backend.asleep is not None
                seconds = self._wake(backend) if woke else 0.0
                summary = woken_line(backend, seconds) if woke else loaded_line(backend, already=True)
                return LoadInfo(backend.config, True, time.perf_counter() - start, summary, woken=woke)
            sleeping = self._kept_serving(config)
            current = self._backend
            if current is not None and keep:
                reason = current.sleep_refusal(1)
                if reason is not None:
                    raise SleepError(f"--keep puts the loaded engine to sleep: {reason}; leave --keep out to "
                                     "replace it")
            if sleeping is None:
                config = self._downloaded(config, progress)  # while the old engine still serves
            if sleeping is None and current is not None:
                self._validate(config)  # refuse a bad configuration while the old engine runs
            kept_line = None
            if current is not None:
                if keep:
                    kept_line = self._keep(current)
                else:
                    self._unload_current()
            if sleeping is not None:
                self._kept.remove(sleeping)
                self._backend = sleeping
                seconds = self._wake(sleeping)
                return LoadInfo(sleeping.config, False, time.perf_counter() - start,
                                woken_line(sleeping, seconds), kept=kept_line, woken=True)
            backend, note, attached = self._new_engine(config, verbose, progress, persist, idle_timeout,
                                                       request, flag_words)
            self._backend = backend
            self.engines_created += 0 if attached else 1
            note = "; ".join(line for line in (note, version) if line) or None
            return LoadInfo(config, False, time.perf_counter() - start, loaded_line(backend, attached=attached),
                            kept=kept_line, note=note, attached=attached)

    def download(self, model: str, *, revision: str | None = None, download_dir: str | None = None,
                 progress: Callable[[str, float], None] | None = None) -> str | None:
        """Make sure a Hugging Face Hub model's files are in the local cache, downloading them now
        when they are not, and return its snapshot directory; None for a model that is not a Hub
        id (a local directory). A complete cached snapshot is used without any network call.

        ``progress(stage, elapsed)`` is called about twice a second while it downloads. Raises
        :class:`~vllm_magic.hub.HubError` in one line (unreachable, gated, missing, no room on
        disk) and :class:`~vllm_magic.hub.DownloadInterrupted` on Ctrl-C (a later download resumes).
        Needs no vLLM: a model can be fetched where vLLM is not installed.
        """
        from ..hub import fetch, is_hub_model

        model = os.fspath(model)
        if not is_hub_model(model):
            return None
        return str(fetch(model, revision, download_dir, progress=progress))

    @staticmethod
    def hub_snapshot(model: str, *, revision: str | None = None, download_dir: str | None = None) -> str | None:
        """A Hub model's complete snapshot in the local cache, or None (no network call)."""
        from ..hub import local_snapshot

        found = local_snapshot(model, revision, download_dir)
        return None if found is None else str(found)

    def _downloaded(self, config: EngineConfig, progress: Callable[[str, float], None] | None) -> EngineConfig:
        """``config`` with its Hub model's files in the local cache: downloaded now (:meth:`download`)
        when they are not."""
        if not config.needs_download:
            return config
        kwargs = config.requested
        self.download(config.model, revision=kwargs.get("revision"), download_dir=kwargs.get("download_dir"),
                      progress=progress)
        return resolve_engine_config(config.model, **kwargs)  # the platform's defaults read the files now

    def _validate(self, config: EngineConfig) -> None:
        from .backends.local import LocalBackend

        LocalBackend.validate(config, self.log)

    def _start(self, config: EngineConfig, verbose: bool, progress: Callable[[str, float], None] | None) -> Backend:
        """A new in-process engine for ``config`` (the one place in-process engines are started)."""
        from .backends.local import LocalBackend

        return LocalBackend.start(config, self.log, verbose=verbose, progress=progress,
                                  on_finished=_weakly(self._finished))

    def _new_engine(self, config: EngineConfig, verbose: bool, progress: Callable[[str, float], None] | None,
                    persist: bool = False, idle_timeout: Any = "default", request: dict[str, Any] | None = None,
                    flag_words: Sequence[str] | None = None) -> tuple[Backend, str | None, bool]:
        """An engine for ``config``: a persisted engine that serves it, attached; else a new persisted
        one (``persist``); else a new in-process engine (:meth:`_start`). Returns it, a line about a
        dead persisted engine that was replaced (or None), and whether it was attached."""
        from .backends import persisted

        timeout = persisted.DEFAULT_IDLE_TIMEOUT if idle_timeout == "default" else idle_timeout
        with persisted.registry_lock():
            engine, note = persisted.find(config)
            started = engine is None and persist
            if started:
                engine = persisted.start(config, idle_timeout=timeout, request=request,
                                         words=None if flag_words is None else list(flag_words))
        if engine is None:
            return self._start(config, verbose, progress), note, False
        if persist and idle_timeout != "default" and not started:
            engine.set_idle_timeout(idle_timeout)
        return self._attach_persisted(engine, started, progress), note, not started

    def attach_persisted(self, model: str | None, flag_words: Sequence[str], *, persist: bool = False,
                         idle_timeout: Any = "default",
                         progress: Callable[[str, float], None] | None = None) -> LoadInfo | None:
        """Attach to the persisted engine that the ``%vllm_load`` line of ``model`` and ``flag_words``
        started, without reading the flags (vLLM is not imported); None when there is none (then
        :meth:`load` decides)."""
        return self._attach_started(time.perf_counter(), progress, persist, idle_timeout, words=list(flag_words),
                                    model=model)

    def _attach_started(self, start: float, progress: Callable[[str, float], None] | None, persist: bool,
                        idle_timeout: Any, request: dict[str, Any] | None = None, words: list[str] | None = None,
                        model: str | None = None) -> LoadInfo | None:
        """The fast path of a load: a running persisted engine that exactly this request started is
        attached to (or already is); None to take the whole path."""
        from .backends import persisted

        with self._lock:
            current = self._backend
            if current is not None and (current.persisted is None or current.death() is not None):
                return None
            engine = persisted.find_request(request, words, model)
            if engine is None or (current is not None and current.persisted.directory != engine.directory):
                return None
            if persist and idle_timeout != "default":
                engine.set_idle_timeout(idle_timeout)
            if current is not None:
                if current.asleep is not None:
                    return None  # waking goes the whole way
                return LoadInfo(current.config, True, time.perf_counter() - start,
                                loaded_line(current, already=True))
            self._backend = self._attach_persisted(engine, False, progress)
            return LoadInfo(engine.config, False, time.perf_counter() - start,
                            loaded_line(self._backend, attached=True), attached=True)

    def _attach_persisted(self, engine: Any, started: bool, progress: Callable[[str, float], None] | None) -> Backend:
        """Wait for a persisted engine to answer and attach to it (one started here and interrupted or
        failed while starting is stopped: nothing is left)."""
        from .backends.remote import RemoteBackend

        t0 = time.perf_counter()
        try:
            engine.wait_ready(progress=progress)
            backend = RemoteBackend.connect(engine.url, api_key=engine.api_key, model=engine.model_name,
                                            on_finished=_weakly(self._finished))
            backend.adopt(engine)
        except BaseException:
            if started:
                engine.stop()
            else:
                engine.release()
            raise
        backend.load_seconds = time.perf_counter() - t0
        self.log.mark(f"{'started' if started else 'attached to'} the persisted engine of {engine.config.model} "
                      f"(pid {engine.pid}, log {engine.log_path})")
        return backend

    def _kept_serving(self, config: EngineConfig) -> Backend | None:
        for backend in self._kept:
            if backend.death() is None and backend.config.serves(config, backend.derived_args):
                return backend
        return None

    def _keep(self, backend: Backend) -> str:
        """Put ``backend`` to sleep and keep it; returns what was done, in one line.

        Level 1 (weights to host RAM) when they fit in the host RAM available with a margin
        (:data:`HOST_RAM_MARGIN`); else level 2 (weights discarded, reloaded on waking) where the
        weights can be read again; else the engine is unloaded. Beyond :attr:`max_kept` sleeping
        engines, the oldest is unloaded.
        """
        import psutil

        self._backend = None
        name = backend.config.short_name
        level = 1
        weights = backend.weight_bytes()
        available = psutil.virtual_memory().available
        if backend.asleep is None and weights is not None and weights + HOST_RAM_MARGIN > available:
            if backend.sleep_refusal(2) is not None:
                self._shut(backend)
                return (f"unloaded {name}: its weights ({weights / GiB:.1f} GiB) do not fit the host RAM "
                        f"available ({available / GiB:.1f} GiB) and cannot be reloaded")
            level = 2
        try:
            report = backend.sleep(max(level, backend.asleep.level if backend.asleep else 0))
        except Exception as exc:  # the engine could not sleep: it is unloaded instead
            self._shut(backend)
            return f"unloaded {name}: it could not sleep ({exc})"
        self._kept.insert(0, backend)
        self.log.mark(f"{backend.config.model} kept asleep at level {report.level}")
        line = f"{name} kept asleep (level {report.level}: {report.holds})"
        if level == 2 and weights is not None:
            line += f"; level 2 because its weights ({weights / GiB:.1f} GiB) do not fit the host RAM available"
        while len(self._kept) > self.max_kept:
            oldest = self._kept.pop()
            self._shut(oldest)
            line += f"; unloaded {oldest.config.short_name} (at most {self.max_kept} sleeping engines)"
        return line

    def _wake(self, backend: Backend) -> float:
        seconds = backend.wake()
        self.log.mark(f"{backend.config.model} woken in {seconds:.2f} s")
        return seconds

    def sleep(self, level: int = 1) -> SleepReport:
        """Put the loaded engine to sleep (GPU only): level 1 moves its weights to host RAM and
        discards the KV cache; level 2 discards the weights too (waking reloads them). Requests
        still running are aborted. The next request, :meth:`wake` or a ``load()`` it serves wakes
        it. Raises :class:`SleepError` where the engine cannot sleep (CPU, a server elsewhere, an
        engine loaded without sleep mode), :class:`NoEngineError` when nothing is loaded."""
        with self._lock:
            backend = self._require()
            reason = backend.sleep_refusal(level)
            if reason is not None:
                raise SleepError(reason)
            report = backend.sleep(level)
            self.log.mark(f"{backend.config.model} asleep at level {report.level} in {report.seconds:.2f} s")
            return report

    def wake(self) -> float:
        """Wake the loaded engine when it sleeps; returns the seconds it took (0.0 when awake)."""
        with self._lock:
            backend = self._require()
            return self._wake(backend) if backend.asleep is not None else 0.0

    @property
    def asleep(self) -> SleepReport | None:
        """The sleep the loaded engine is in, or None (awake, or nothing loaded)."""
        backend = self._backend
        return None if backend is None else backend.asleep

    @property
    def kept(self) -> list[KeptEngine]:
        """The sleeping engines kept for switching back, most recent first."""
        return [kept_engine(b) for b in list(self._kept)]

    def connect(self, url: str, *, api_key: str | None = None, model: str | None = None) -> LoadInfo:
        """Use the vLLM server at ``url`` (any OpenAI-compatible vLLM server) instead of an engine in
        this process; ``model`` picks one of the models it serves (None: the first).

        The server is reached before anything else changes: when it cannot be (or refuses the key,
        or does not serve ``model``), :class:`~vllm_magic.errors.ServerError` is raised and the
        engine the session had is kept. Attaching to the server already attached returns at once.
        """
        from .backends.remote import RemoteBackend

        start = time.perf_counter()
        with self._lock:
            current = self._backend
            if current is not None and current.attached_to(url, api_key, model) and current.death() is None:
                return LoadInfo(current.config, True, time.perf_counter() - start,
                                loaded_line(current, already=True))
            backend = RemoteBackend.connect(url, api_key=api_key, model=model, on_finished=_weakly(self._finished))
            if self._backend is not None:
                self.unload(embedder=False)
            self._backend = backend
            return LoadInfo(backend.config, False, time.perf_counter() - start, loaded_line(backend))

    def serve(self, model: str | None = None, *, host: str = "127.0.0.1", port: int | None = None,
              api_key: str | None = None, handoff: bool = False, server_kwargs: dict[str, Any] | None = None,
              timeout: float | None = None, progress: Callable[[str, float], None] | None = None,
              persist: bool = False, idle_timeout: Any = "default", **engine_kwargs: Any) -> Any:
        """Start vLLM's OpenAI-compatible server for a model, owned by this kernel; returns the
        :class:`~vllm_magic.engine.backends.server.ManagedServer` once it answers.

        ``model`` None serves the model loaded here (with its engine arguments), else the demo
        model; engine arguments and platform defaults are those of :meth:`load`. ``server_kwargs``
        are ``vllm serve``'s own options (``served_model_name``, ``tool_call_parser``, ...).
        ``handoff`` moves the loaded engine to the server: it is unloaded first (two copies may not
        fit one GPU), the server starts on its configuration, and the session attaches to it.
        ``persist`` makes it a persisted engine (a :class:`~.backends.persisted.PersistedEngine`):
        it outlives the kernel as :meth:`load`'s do, and a later ``serve(..., persist=True)`` of the
        same configuration, from this kernel or another, finds it running (``found``).
        """
        from .backends.persisted import PersistedEngine
        from .backends.server import READY_TIMEOUT, ManagedServer, check_host, pick_port

        check_host(host, api_key)  # mistakes are refused before anything is unloaded
        with self._lock:
            mine = self.server
            if persist and isinstance(mine, PersistedEngine) and mine.alive:
                wanted = self.resolve(model, **engine_kwargs) if model is not None or engine_kwargs else mine.config
                if mine.config.serves(wanted, lambda: mine.derived):
                    mine.found = True
                    return mine
            if self.server is not None and self.server.alive:
                raise ConfigError(f"this kernel already serves {self.server.model_name} at {self.server.base_url}; "
                                  "stop it first (%vllm_serve --stop)")
            local = self._backend if self._backend is not None and self._backend.kind == "local" else None
            if handoff:
                if local is None:
                    raise ConfigError("--handoff moves the engine loaded in this kernel to a server: load one "
                                      "first (%vllm_load)")
                if model is not None or engine_kwargs:
                    raise ConfigError("--handoff serves the loaded engine as it is: leave out the model and "
                                      "engine flags")
                config = local.config
            else:
                if model is None and local is not None:
                    model, engine_kwargs = local.config.model, {**local.config.requested, **engine_kwargs}
                config = self._downloaded(self.resolve(model, **engine_kwargs), progress)
                if local is not None and config.platform == "cuda":
                    raise ConfigError("the engine loaded in this kernel holds the GPU: move it to the server "
                                      "with --handoff, or free it first with %vllm_unload")
            if persist:
                return self._serve_persisted(config, host, port, api_key, handoff, server_kwargs, timeout,
                                             progress, idle_timeout)
            port = pick_port(host, port)
            if handoff:
                self.unload(embedder=False)
            try:
                server = ManagedServer.start(config, host=host, port=port, api_key=api_key,
                                             server_kwargs=server_kwargs)
                server.wait_ready(READY_TIMEOUT if timeout is None else timeout, progress)
            except ServerError as exc:
                if handoff:
                    raise ServerError(f"{exc}\nThe engine was unloaded for the handoff: %vllm_load starts it "
                                      "in this kernel again.") from None
                raise
            self.server = server
            if handoff:
                self.connect(server.url, api_key=api_key, model=server.model_name)
            return server

    def _serve_persisted(self, config: EngineConfig, host: str, port: int | None, api_key: str | None,
                         handoff: bool, server_kwargs: dict[str, Any] | None, timeout: float | None,
                         progress: Callable[[str, float], None] | None, idle_timeout: Any) -> Any:
        from .backends import persisted

        with persisted.registry_lock():
            engine, _ = persisted.find(config, served=True)
            if engine is None:
                if handoff:
                    self.unload(embedder=False)
                engine = persisted.start(
                    config, idle_timeout=persisted.DEFAULT_IDLE_TIMEOUT if idle_timeout == "default" else idle_timeout,
                    server_kwargs=server_kwargs, host=host, port=port, api_key=api_key)
                engine.found = False
            else:
                engine.lease()
                engine.found = True
                if idle_timeout != "default":
                    engine.set_idle_timeout(idle_timeout)
        try:
            engine.ready_seconds = engine.wait_ready(timeout or persisted.READY_TIMEOUT, progress)
        except BaseException:  # one started here is stopped; one found running is left to its other users
            if engine.found:
                engine.release()
            else:
                engine.stop()
            raise
        self.server = engine
        if handoff:
            if self._backend is not None:
                self.unload(embedder=False)
            self._backend = self._attach_persisted(engine, False, progress)
        return engine

    def stop_server(self) -> Any:
        """Stop the server this kernel started (detaching the session when it uses it); returns it,
        or None when none runs."""
        with self._lock:
            server, self.server = self.server, None
            if server is None:
                return None
            if self.url == server.url:
                self.unload(embedder=False)
            server.stop()
            return server

    def unload(self, stop: bool = False, *, embedder: bool = True) -> bool:
        """Shut the engine down, and every sleeping engine kept, and the embedding engine
        (:meth:`load_embedder`; ``embedder=False`` keeps it), and wait until their processes (and GPU
        memory) are gone. A persisted engine is detached from (it ends by itself after its
        idle timeout), or ended now with ``stop=True``, whoever else is attached.

        Returns False when nothing was loaded. Safe to call twice.
        """
        if stop:
            with self._lock:
                engines = [b.persisted for b in [self._backend, *self._kept] if b is not None and b.persisted]
                loaded = self.unload(embedder=embedder)
                for engine in engines:
                    engine.stop()
                return loaded
        with self._lock:
            embedded = embedder and self.unload_embedder()  # first: its memory is awaited on its own
            kept, self._kept = self._kept, []
            if self._backend is None and not kept:
                return embedded
            # Every engine stops before the wait for memory: each one's baseline counted the others.
            baselines = [b.memory_before_load for b in [*kept, self._backend]
                         if b is not None and b.memory_before_load is not None]
            for backend in kept:
                self._shut(backend, baseline=None)
            if self._backend is not None:
                self._unload_current(baseline=min(baselines) if baselines else "own")
            return True

    def stop_unattached(self) -> tuple[list[str], list[str]]:
        """End this user's persisted engines that no kernel is attached to; returns their names, and
        the names of those kept because kernels are attached."""
        from .backends import persisted

        stopped, kept = [], []
        with persisted.registry_lock():
            running = persisted.engines()
        for engine in running:
            if engine.kernels():
                kept.append(engine.config.short_name)
            else:
                engine.stop()
                stopped.append(engine.config.short_name)
        return stopped, kept

    def _unload_current(self, baseline: Any = "own") -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            self.last_unload = self._shut(backend, baseline)

    def _shut(self, backend: Backend, baseline: Any = "own") -> UnloadReport:
        self.log.mark(f"unloading {backend.config.model}")
        if baseline == "own" and self._embedder is not None:  # an embedder started since stays in use
            baseline = self._embedder.remaining_after(backend)
        report = backend.shutdown(baseline)
        if report.processes_killed:
            self.log.mark(f"killed {report.processes_killed} engine process(es) that outlived shutdown")
        return report

    # ----- requests ------------------------------------------------------------------------------
    def submit(self, prompts: PromptLike | Sequence[PromptLike], sampling: Any = None, *,
               raw: bool | None = None, system: str | None = None, json_schema: Any = None,
               regex: str | None = None, choice: list[str] | None = None, tools: list[dict] | None = None,
               chat_template_kwargs: dict[str, Any] | None = None, stream: bool = True, lora: str | None = None,
               **overrides: Any) -> list[RequestHandle]:
        """Submit one or many prompts together; returns one handle per prompt.

        ``prompts`` is a string, a conversation (a list of ``{"role", "content"}`` dicts), or a list
        of either. Strings go through the model's chat template as one user message (with
        ``system`` or the defaults' system prompt) unless ``raw`` (default: the session's) is true.
        ``overrides`` are sampling options (``temperature=0``, ``max_tokens=5``, ``n=2``, ...) over
        the session's defaults; ``json_schema``, ``regex`` or ``choice`` constrain the answer.
        ``sampling`` is a ready ``SamplingParams`` used as given, instead of defaults and overrides.
        ``tools`` (OpenAI tool dicts) and ``chat_template_kwargs`` (``enable_thinking``, ...) go to
        the chat template (:mod:`.tool_calls` says how tools reach a template that ignores them).
        With a reasoning parser (:attr:`parsers`), each answer's thinking is kept apart.
        ``stream=False`` says nobody watches the answers grow: a server elsewhere then sends each
        one whole, the batch in one HTTP request (much faster for batches); the handles still
        iterate, with each answer in one piece at its end. An engine in this process streams anyway.
        ``lora`` names a registered LoRA adapter (:meth:`add_lora`) to answer with; None or
        ``"base"``: the model without one.
        """
        backend = self._require()
        options = self._options(sampling, raw, system, json_schema, regex, choice, tools, chat_template_kwargs,
                                stream, overrides, lora)
        requests = self._requests(backend, as_prompt_list(prompts), options)
        return self._add(backend, requests)

    def grid(self, prompts: PromptLike | Sequence[PromptLike], axes: dict[str, Sequence[Any]], *,
             raw: bool | None = None, system: str | None = None, stream: bool = False, **overrides: Any) -> Grid:
        """Every prompt under every combination of sampling settings, in one submission.

        ``axes`` maps sampling options to the values to try (``{"temperature": [0, 0.7, 1.2],
        "top_p": [0.9, 1.0]}``: 6 settings; ``{"lora": ["base", "pirate"]}`` puts registered LoRA
        adapters beside the model without one); ``overrides`` hold for all of them. Returns a
        :class:`~vllm_magic.engine.requests.grid.Grid` (``results()`` waits, ``to_pandas()``, an HTML
        table in a notebook). Each answer carries its logprobs (``logprobs=0`` unless asked for
        more: the table's mean logprob). Checked before anything is submitted: the options, the
        values' ranges, and the count against what the engine runs at once.
        """
        backend = self._require()
        items = as_prompt_list(prompts)
        settings = grid_settings(axes, overrides)
        check_grid_size(len(items), len(settings), backend.max_num_seqs or GRID_LIMIT)
        requests = []
        for setting in settings:
            merged = {"logprobs": 0, **overrides, **setting}
            lora = merged.pop("lora", None)
            options = self._options(None, raw, system, None, None, None, None, None, stream, merged, lora)
            requests.append(self._requests(backend, items, options))
        handles = self._add(backend, [r for group in requests for r in group])
        return Grid(items, settings, [handles[i * len(items):(i + 1) * len(items)] for i in range(len(settings))])

    def _options(self, sampling: Any, raw: bool | None, system: str | None, json_schema: Any, regex: str | None,
                 choice: list[str] | None, tools: list[dict] | None, chat_template_kwargs: dict[str, Any] | None,
                 stream: bool, overrides: dict[str, Any], lora: str | None = None) -> RequestOptions:
        structured = {k: v for k, v in (("json_schema", json_schema), ("regex", regex), ("choice", choice))
                      if v is not None}
        if sampling is not None and (overrides or structured):
            raise TypeError("pass either a SamplingParams or sampling options, not both")
        return RequestOptions(
            raw=self.defaults.raw if raw is None else raw,
            system=self.defaults.system_prompt if system is None else system,
            overrides=overrides, structured=structured, sampling=sampling, tools=tools,
            template=chat_template_kwargs, stream=stream, lora=lora)

    def _requests(self, backend: Backend, items: list[PromptLike],
                  options: RequestOptions) -> list[tuple[RequestHandle, Any]]:
        """The handles and ready requests of one batch, checked, nothing submitted yet."""
        self._check(backend, options)
        ready = backend.prepare_requests(items, options, self.defaults)  # the one crossing before add
        parse = json.loads if options.structured.get("json_schema") is not None else None
        reasoning = self._parsers.reasoning
        tokenizer = backend.tokenizer if reasoning else None
        requests = []
        for request in ready:
            splitter = ReasoningSplitter(reasoning, tokenizer) if reasoning else None
            handle = RequestHandle(f"vm-{next(self._ids)}", request.prompt.text, request.prompt.token_ids,
                                   request.params.n, self._abort_one, parse, sampling_params=request.params,
                                   splitter=splitter, logprobs_mode=backend.logprobs_mode,
                                   lora=None if request.lora is None else adapter_names(options.lora))
            requests.append((handle, request))
        return requests

    def _add(self, backend: Backend, requests: list[tuple[RequestHandle, Any]]) -> list[RequestHandle]:
        """Submit ready requests to the engine together (they join before its next step)."""
        if backend.asleep is not None:  # a request to a sleeping engine wakes it: nobody asks to be told to
            with self._lock:
                if backend.asleep is not None and self._backend is backend:
                    self._wake(backend)
        backend.add(requests)
        with self._counter_lock:
            self.submissions += 1
        return [handle for handle, _ in requests]

    @staticmethod
    def _check(backend: Backend, options: RequestOptions) -> None:
        """What no front-end may ask, in one line each: the same for ``%%vllm``, ``VLLM``,
        ``ChatVLLM`` and Python, before anything reaches the engine."""
        if len(options.structured) > 1:
            raise RequestError("constrain the answer with one of json_schema, regex and choice, not "
                               + " and ".join(options.structured))
        thinking = (options.template or {}).get("enable_thinking")
        template = backend.chat_template
        if thinking is not None and template is not None and "enable_thinking" not in template:
            raise RequestError("--think/--no-think (enable_thinking) switch thinking in the chat template, and "
                               "this model's template has no such switch")
        for name, flag in (("logprobs", "--logprobs"), ("prompt_logprobs", "--prompt-logprobs")):
            wanted = options.overrides.get(name)
            if wanted is None and options.sampling is not None:
                wanted = getattr(options.sampling, name, None)
            if wanted is not None:
                check_logprobs(name, flag, wanted, backend.max_logprobs)
        budget = options.overrides.get("thinking_token_budget")
        if budget is not None:
            if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
                raise RequestError(f"the thinking budget (--thinking-budget, thinking_token_budget) is a number "
                                   f"of tokens, 0 or more, not {budget!r}")
            refusal = backend.thinking_budget_refusal()
            if refusal is not None:
                raise RequestError(f"a thinking budget (--thinking-budget, thinking_token_budget): {refusal}")

    # ----- LoRA adapters ------------------------------------------------------------------------------
    def add_lora(self, name: str, path: str | os.PathLike, *, any_base: bool = False) -> Adapter:
        """Register the LoRA adapter in ``path`` (a directory written by peft's ``save_pretrained``)
        under ``name``, for requests to name (``submit(..., lora=name)``, ``%%vllm --lora NAME``).

        The engine must have been loaded with ``--enable-lora`` (``enable_lora=True``) and a
        ``max_lora_rank`` at least the adapter's rank. The adapter is loaded now, so that a broken
        one is refused here. A server elsewhere loads it at runtime where it allows that
        (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``; ``path`` is then a path on the server's machine).
        Every mistake is one :class:`~vllm_magic.engine.requests.adapters.AdapterError` line: not
        an adapter, a rank over the engine's, weights for another hidden size, a base model of
        another name (``any_base=True`` allows that one: the same model saved under another name).
        Registering a name again replaces its adapter. Adapters belong to their engine: loading
        another model forgets them.
        """
        backend = self._require()
        with self._lock:
            adapter = backend.add_adapter(name, os.fspath(path), any_base=any_base)
        self.log.mark(f"adapter {adapter.name} registered from {adapter.path}")
        return adapter

    def remove_lora(self, name: str) -> Adapter:
        """Forget the adapter registered as ``name``; returns it."""
        backend = self._require()
        with self._lock:
            return backend.remove_adapter(name)

    @property
    def adapters(self) -> list[Adapter]:
        """The LoRA adapters requests can name now, in the order of their names."""
        backend = self._backend
        if backend is None or backend.death() is not None:
            return []
        return [adapter for _, adapter in sorted(backend.adapters.items())]

    def generate(self, prompt: PromptLike, **kwargs: Any) -> GenerationResult:
        """Submit one prompt and wait for its result (Ctrl-C aborts it)."""
        return self.submit(prompt, **kwargs)[0].result()

    def render_prompt(self, prompt: PromptLike, *, raw: bool | None = None, system: str | None = None) -> str:
        """The exact text that would be sent for ``prompt`` (after the chat template)."""
        backend = self._require()
        raw = self.defaults.raw if raw is None else raw
        system = self.defaults.system_prompt if system is None else system
        text = backend.render([prompt], raw, system)[0].text
        return text if isinstance(text, str) else text.result()  # a server's rendering, fetched now

    def abort_all(self) -> int:
        """Abort every request in flight (the Stop button); returns how many were stopped."""
        backend = self._backend
        return 0 if backend is None else backend.abort_all()

    def _abort_one(self, request_id: str) -> None:
        backend = self._backend
        if backend is not None:
            backend.abort([request_id])

    def run_on_engine(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(llm)`` on the driver thread, between engine steps (benchmarks use raw vLLM here)."""
        return self._require().call(fn)

    def add_listener(self, fn: Callable[[GenerationResult], None]) -> None:
        """Call ``fn(result)`` after every finished request, on the listeners' thread (the widgets'
        status line). Its errors are reported, not raised."""
        self.listeners.add(fn)

    def remove_listener(self, fn: Callable[[GenerationResult], None]) -> None:
        self.listeners.remove(fn)

    def _finished(self, handle: RequestHandle) -> None:
        # Called on the driver thread: count, then hand the result to the listeners' thread.
        result = handle.snapshot()
        with self._counter_lock:
            self.requests_served += 1
            self.tokens_out += result.output_tokens
        self.last_result = result
        self.listeners.notify(result)

    def _require(self) -> Backend:
        backend = self._backend
        if backend is None:
            raise NoEngineError("no model is loaded: run %vllm_load (the demo model) or %vllm_load MODEL first")
        death = backend.death()
        if death is not None:
            raise EngineDiedError(backend.died_message(death))
        return backend

    # ----- embeddings ----------------------------------------------------------------------------
    #: The embedding engine beside the generation engine (:meth:`load_embedder`), or None.
    _embedder: Embedder | None = None
    #: What the last unload of an embedding engine left behind (processes, device memory).
    last_embedder_unload: UnloadReport | None = None

    @property
    def embedder(self) -> Embedder | None:
        """The embedding engine (None when none is loaded); for tests and benchmarks: front-ends
        use :meth:`embed` and :meth:`score`."""
        return self._embedder

    def resolve_embedder(self, model: str | os.PathLike | None = None, **engine_kwargs: Any) -> EngineConfig:
        """The configuration ``load_embedder(model, **engine_kwargs)`` would run (nothing is started)."""
        import_vllm()
        return embedding_config(model, engine_kwargs)

    def load_embedder(self, model: str | os.PathLike | None = None, *, url: str | None = None,
                      api_key: str | None = None, verbose: bool = False,
                      progress: Callable[[str, float], None] | None = None, **engine_kwargs: Any) -> LoadInfo:
        """Load an embedding model beside the generation engine (:meth:`embed`, :meth:`score`), or
        keep the embedder when it serves that request.

        ``model`` is any model vLLM pools into embeddings, by Hub id (fetched as :meth:`load` fetches
        it) or directory; None: the demo model, made an embedding model by vLLM's pooling runner
        (``runner="pooling"``, ``convert="embed"``: the last token's hidden state, normalized).
        ``engine_kwargs`` are vLLM engine arguments, as for :meth:`load`. ``url`` uses the
        ``/v1/embeddings`` of a vLLM server instead (``model``: which of its models, None: the
        first; ``api_key``: its key); a server that serves no embeddings is refused in one
        :class:`ServerError` line.

        One embedder at a time, by the rule of :meth:`load` (:meth:`EngineConfig.serves`): a request
        the embedder serves returns at once; another is checked first (a configuration vLLM refuses,
        or a model it would pool for something else: :class:`ConfigError`, the embedder kept), then
        replaces it: the old one is shut down and its memory given back before the new one starts.
        The generation engine is never touched. On an NVIDIA GPU the embedder is sized as every engine
        vllm-magic starts (:mod:`.gpu_memory`): weights and a KV cache for ``concurrency`` full-length
        sequences, at most half the memory left free beside the generation engine; one that does
        not fit is refused in one line (:class:`~.gpu_memory.DoesNotFit`, an
        :class:`EngineStartError`) before anything starts, and the generation engine goes on
        serving. On a CPU both live in host RAM, each with its own KV cache (1 GiB by default).
        """
        start = time.perf_counter()
        if url is not None:
            if engine_kwargs:
                raise ConfigError(f"engine arguments ({', '.join(sorted(engine_kwargs))}) shape an engine started "
                                  "here; a server embeds with the arguments it was started with")
            name = None if model is None else os.fspath(model)
            with self._lock:
                current = self._embedder
                if current is not None and current.attached_to(url, api_key, name):
                    return LoadInfo(current.config, True, time.perf_counter() - start,
                                    current.loaded_line(already=True))
                embedder = Embedder.connect(url, api_key=api_key, model=name)  # before the old one goes
                self._replace_embedder(embedder)
                return LoadInfo(embedder.config, False, time.perf_counter() - start, embedder.loaded_line())
        quiet_vllm_environment(verbose)
        current = self._embedder
        if model is not None and (current is None or current.config.model != os.fspath(model)):
            self.download(os.fspath(model), revision=engine_kwargs.get("revision"),
                          download_dir=engine_kwargs.get("download_dir"), progress=progress)
        import_vllm(verbose)
        installed = vllm_version()
        if version_too_old(installed):
            raise ConfigError(version_line(installed))
        config = embedding_config(model, engine_kwargs)
        with self._lock:
            current = self._embedder
            if current is not None and current.serves(config):
                return LoadInfo(current.config, True, time.perf_counter() - start, current.loaded_line(already=True))
            config = self._downloaded(config, progress)
            check_embedding_config(config, self.log)  # refused while the embedder loaded now still serves
            self._replace_embedder(None)
            self._embedder = Embedder.start(config, self.log, verbose=verbose, progress=progress)
            return LoadInfo(config, False, time.perf_counter() - start, self._embedder.loaded_line())

    def unload_embedder(self) -> bool:
        """Shut the embedding engine down and wait until its processes (and GPU memory) are gone (a
        server: let go of it); the generation engine keeps serving. False when none was loaded."""
        with self._lock:
            if self._embedder is None:
                return False
            self._replace_embedder(None)
            return True

    def _replace_embedder(self, embedder: Embedder | None) -> None:
        old, self._embedder = self._embedder, embedder
        if old is not None:
            self.log.mark(f"unloading the embedder {old.config.model}")
            self.last_embedder_unload = old.shutdown()

    def embed(self, texts: str | Sequence[str]) -> list[list[float]]:
        """The embedding of each text, in order, as lists of plain floats (a single text: a list of
        one). Texts longer than the model's context are truncated to it (their last tokens are
        dropped), never refused.

        An embedder in this kernel computes on its engine's one driver thread: Ctrl-C stops the
        wait here, the engine finishes that call and keeps serving. Raises :class:`NoEmbedderError`
        when no embedder is loaded (say how to load one), :class:`RequestError` for texts vLLM
        refuses (an empty one).
        """
        items = self._texts(texts, "texts to embed")
        embedder = self._require_embedder()
        return embedder.embed(items) if items else []

    def score(self, query: str, documents: str | Sequence[str]) -> list[float]:
        """How close each document is to ``query``, in order: vLLM's ``LLM.score``, which for an
        embedding model is the cosine similarity of their embeddings (1.0: the same direction); a
        server's embeddings are compared here the same way. Texts are truncated as in :meth:`embed`.
        A model vLLM cannot score with is refused in one :class:`RequestError` line."""
        if not isinstance(query, str):
            raise RequestError(f"the query to score against is a string, not {type(query).__name__}")
        items = self._texts(documents, "documents to score")
        embedder = self._require_embedder()
        return embedder.score(query, items) if items else []

    def run_on_embedder(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(llm)`` with the embedder's raw ``vllm.LLM`` on its driver thread (benchmarks)."""
        return self._require_embedder().call(fn)

    @staticmethod
    def _texts(texts: str | Sequence[str], what: str) -> list[str]:
        items = [texts] if isinstance(texts, str) else list(texts)
        wrong = sorted({type(item).__name__ for item in items if not isinstance(item, str)})
        if wrong:
            raise RequestError(f"the {what} are strings, not {', '.join(wrong)}")
        return items

    def _require_embedder(self) -> Embedder:
        embedder = self._embedder
        if embedder is None:
            raise NoEmbedderError(NO_EMBEDDER)
        return embedder

    def _embedder_line(self) -> str | None:
        embedder = self._embedder
        return None if embedder is None else embedder.describe()

    # ----- status --------------------------------------------------------------------------------
    def status(self) -> SessionStatus:
        """Model, engine args, platform, memory, uptime and request counters."""
        backend = self._backend
        kept = self.kept
        if backend is None:
            return SessionStatus(loaded=False, submissions=self.submissions, requests_served=self.requests_served,
                                 tokens_out=self.tokens_out, kept=kept, embedder=self._embedder_line())
        dead = backend.death()
        memory, kind = (None, "") if dead else backend.memory()
        config = backend.config
        return SessionStatus(
            loaded=True, model=config.model, platform=config.platform,
            engine_args=dict(config.engine_kwargs), dtype=backend.dtype, max_model_len=backend.max_model_len,
            kv_cache_tokens=backend.kv_cache_tokens, memory_bytes=memory, memory_kind=kind,
            uptime=time.monotonic() - backend.started, load_seconds=backend.load_seconds,
            submissions=self.submissions, requests_served=self.requests_served, tokens_out=self.tokens_out,
            requests_live=backend.live_count, vllm_version=backend.vllm_version,
            fingerprint=config.fingerprint, log_path=str(self.log.path), dead=dead,
            server=self.url, asleep=backend.asleep, kept=kept,
            persisted=None if backend.persisted is None or dead else backend.persisted.describe(),
            gpu=None if dead else gpu_line(backend), embedder=self._embedder_line(),
            adapters=None if dead or not backend.lora_enabled else [a.summary for a in self.adapters])


def check_logprobs(name: str, flag: str, wanted: Any, limit: int | None) -> None:
    """Refuse a logprobs count the engine would refuse, in one line naming the flag that raises it."""
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < -1:
        raise RequestError(f"{flag} ({name}) is how many alternatives to return per token, 0 or more "
                           f"(-1: the whole vocabulary), not {wanted!r}")
    if limit is None or limit == -1:
        return
    if wanted == -1 or wanted > limit:
        asked = "the whole vocabulary" if wanted == -1 else str(wanted)
        raise RequestError(f"{flag} {wanted}: this engine returns at most {limit} logprobs per token (vLLM's "
                           f"max_logprobs), not {asked}; load it with --max-logprobs {wanted} to allow more")


def _weakly(method: Callable[[Any], None]) -> Callable[[Any], None]:
    """A callback that does not keep its object alive (the engine must not pin the session)."""
    ref = weakref.WeakMethod(method)

    def call(value: Any) -> None:
        fn = ref()
        if fn is not None:
            fn(value)

    return call


_session: EngineSession | None = None
_session_lock = threading.Lock()


def get_session() -> EngineSession:
    """The process-wide engine session (created on first use; its engine is shut down at exit)."""
    global _session
    with _session_lock:
        if _session is None:
            _session = EngineSession()
        return _session
