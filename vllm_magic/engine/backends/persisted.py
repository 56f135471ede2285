"""Engines that outlive their kernel: ``%vllm_load MODEL --persist``.

A persisted engine is vLLM's OpenAI-compatible server in a session of its own, owned by the user, not
by a kernel: a restarted kernel (or another one) attaches to it in a fraction of a second instead of
loading the model again. Each one has a private directory in :func:`~vllm_magic.paths.runtime_dir`
(0700, like the runtime directory itself):

* ``engine.json``: what it runs (the :class:`EngineConfig`, so the one "serves" rule finds it), its
  address, its process, when it started and its idle timeout;
* ``engine.sock``: the Unix socket it listens on, where the installed vLLM has ``--uds`` (else it
  listens on 127.0.0.1, and only the key keeps other users out);
* ``key``: a random API key (0600) that its generation routes (``/v1/...``) require;
* ``kernels/``: one lease per attached kernel (its pid, process start time and kernel id).

The engine's own watchdog (:mod:`.persisted_process`) ends it after its idle timeout with no kernel
attached and no request, or when its directory is removed, and removes the directory. A kernel that
looks for an engine (:func:`find`) removes what a dead one left (its process killed, or crashed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ...errors import ServerError
from ...paths import logs_dir, runtime_dir
from ..config import EngineConfig
from ..log import EngineLog
from ..flags import format_duration
from .persisted_process import http_client, live_leases, process_alive
from .processes import at_exit
from .server import (READY_TIMEOUT, _free_port, _group_processes, check_host, client_snippet, launch, local_url,
                     pick_port, server_command)

__all__ = ["PersistedEngine", "DEFAULT_IDLE_TIMEOUT", "find", "find_request", "request_key", "start",
           "registry_lock", "engines", "http_client"]

#: Seconds a persisted engine waits with no kernel attached and no request before it ends.
DEFAULT_IDLE_TIMEOUT = 15 * 60.0
#: Seconds a stopping engine gets before its processes are killed.
STOP_GRACE = 20.0
#: A Unix socket's path has at most 107 bytes (108 with its NUL); longer ones listen on loopback.
_SOCKET_PATH_MAX = 107
_POLL = 0.5

#: ``vllm serve`` processes this kernel started (reaped when they exit, so none stays a zombie).
_CHILDREN: list[subprocess.Popen] = []
#: Lease files of this kernel, removed when it exits.
_LEASES: set[Path] = set()


@dataclass
class PersistedEngine:
    """One persisted engine, as its ``engine.json`` describes it."""

    directory: Path
    pid: int
    create_time: float
    config: EngineConfig
    url: str
    model_name: str
    log_path: str
    started: float = field(default_factory=time.time)
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
    #: Values vLLM derived while starting (``max_model_len``), for the "serves" rule.
    derived: dict[str, Any] = field(default_factory=dict)
    #: Whether its server has vLLM's sleep routes (a GPU engine on its private socket).
    sleep_routes: bool = False
    #: Whether it listens where outside clients reach it (``%vllm_serve --persist``).
    served: bool = False
    #: The load request that started it, as given (:func:`request_key`), and the engine flags of the
    #: ``%vllm_load`` line (None from Python): the same request finds it again without vLLM's import.
    request: dict[str, Any] = field(default_factory=dict)
    words: list[str] | None = None

    # Not part of the record: how this kernel came to it (``%vllm_serve --persist`` says so).
    ready_seconds = None
    found = False

    # ----- the record ------------------------------------------------------------------------------
    @classmethod
    def read(cls, directory: Path) -> "PersistedEngine | None":
        """The engine whose directory is ``directory``, or None when it has no readable record."""
        try:
            data = json.loads((directory / "engine.json").read_text())
            config = EngineConfig(**data.pop("config"))
            data.pop("id", None)
            return cls(directory=directory, config=config, **data)
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def write(self) -> None:
        data = asdict(self)
        data.pop("directory")
        data["id"] = self.id
        tmp = self.directory / "engine.json.tmp"
        tmp.write_text(json.dumps(data, default=str))
        os.replace(tmp, self.directory / "engine.json")  # readers see the old record or the new one

    @property
    def id(self) -> str:
        return self.directory.name

    @property
    def api_key(self) -> str | None:
        try:
            return (self.directory / "key").read_text().strip() or None
        except OSError:
            return None

    @property
    def log(self) -> EngineLog:
        return EngineLog(self.log_path)

    @property
    def base_url(self) -> str:
        """The OpenAI clients' ``base_url`` (a served engine; a private one is reached over its socket)."""
        return self.url + "/v1"

    def client_snippet(self) -> str:
        """Ready-to-run code for the official ``openai`` client against a served engine."""
        return client_snippet(self.base_url, self.model_name, self.api_key)

    # ----- state -----------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Whether its server process still runs (checked against its start time: pids are reused)."""
        _reap()
        return process_alive(self.pid, self.create_time)

    def processes(self) -> list[Any]:
        """Its processes still running: the server, vLLM's engine core and workers."""
        return _group_processes(self.pid)

    def kernels(self) -> list[dict[str, Any]]:
        """The kernels attached now (their leases), oldest first."""
        return sorted(live_leases(self.directory), key=lambda lease: lease.get("since", 0))

    def set_idle_timeout(self, seconds: float | None) -> None:
        """Change when it ends unattached (its watchdog re-reads it)."""
        if seconds != self.idle_timeout:
            self.idle_timeout = seconds
            self.write()

    def describe(self) -> str:
        """One line for ``%vllm_status``: since when, which kernels, when it ends by itself."""
        kernels = self.kernels()
        mine = os.getpid()
        names = ", ".join(("this kernel" if k.get("pid") == mine else f"kernel {k.get('kernel') or 'pid ' + str(k.get('pid'))}")
                          for k in kernels) or "none"
        ends = ("never by itself" if self.idle_timeout is None
                else f"after {format_duration(self.idle_timeout)} with no kernel attached and no request")
        where = f"{self.model_name} served at {self.base_url} · " if self.served else ""
        return (f"{where}persisted since {time.strftime('%H:%M', time.localtime(self.started))} "
                f"({format_duration(time.time() - self.started)}), pid {self.pid}; kernels attached: {names}; "
                f"ends {ends} (%vllm_unload --stop ends it now)")

    # ----- attaching -------------------------------------------------------------------------------
    def lease(self) -> Path:
        """Attach this kernel: its lease keeps the engine from ending while the kernel lives."""
        import psutil

        path = self.directory / "kernels" / str(os.getpid())
        path.write_text(json.dumps({"pid": os.getpid(), "create_time": psutil.Process().create_time(),
                                    "kernel": _kernel_id(), "since": time.time()}))
        _LEASES.add(path)
        return path

    def release(self) -> None:
        """Detach this kernel (the engine keeps running until its idle timeout)."""
        path = self.directory / "kernels" / str(os.getpid())
        _LEASES.discard(path)
        with contextlib.suppress(OSError):
            path.unlink()

    def wait_ready(self, timeout: float = READY_TIMEOUT,
                   progress: Callable[[str, float], None] | None = None) -> float:
        """Wait until its server answers ``/health``; returns the seconds waited. Raises
        :class:`ServerError` with the cause from its log when it exits or stays silent."""
        import httpx

        start = time.monotonic()
        with self.log.follow(progress), http_client(self.url, timeout=2.0) as client:
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        return time.monotonic() - start
                except httpx.HTTPError:
                    pass  # not listening yet
                if not self.alive:
                    raise ServerError(self._failure("exited while starting"))
                if time.monotonic() - start > timeout:
                    raise ServerError(self._failure(f"did not answer /health within {timeout:.0f} s"))
                time.sleep(_POLL)

    def _failure(self, what: str) -> str:
        reasons = self.log.errors_since(0, limit=4)
        cause = "\n".join(reasons) if reasons else "(its log names no error)"
        return f"the persisted engine of {self.config.short_name} {what}:\n{cause}\nIts log: {self.log_path}"

    # ----- ending ----------------------------------------------------------------------------------
    def stop(self, grace: float = STOP_GRACE) -> int:
        """End it now, whoever is attached: SIGTERM, then SIGKILL to what is left of its group after
        ``grace`` seconds; its directory goes. Returns how many processes had to be killed."""
        import psutil

        shutil.rmtree(self.directory, ignore_errors=True)
        if not self.alive:
            return 0
        group = self.processes()
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGTERM)
        leader = [p for p in group if p.pid == self.pid]
        psutil.wait_procs(leader, timeout=grace)
        left = [p for p in self.processes()]
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(left, timeout=10)
        _reap()
        return len(left)

    def remove(self) -> None:
        """Remove what a dead engine left (its socket, key and record)."""
        shutil.rmtree(self.directory, ignore_errors=True)


# ----- the registry ---------------------------------------------------------------------------------

@contextlib.contextmanager
def registry_lock() -> Iterator[Path]:
    """Hold the user's registry of persisted engines: two kernels never start two for one request."""
    root = runtime_dir()
    with open(root / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield root
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def engines(root: Path | None = None) -> list[PersistedEngine]:
    """The persisted engines running now (what dead ones left is removed)."""
    root = root or runtime_dir()
    found = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        engine = PersistedEngine.read(directory)
        if engine is not None and engine.alive:
            found.append(engine)
        elif engine is not None:
            engine.remove()
    return found


def find(config: EngineConfig, *, served: bool = False) -> tuple[PersistedEngine | None, str | None]:
    """A running persisted engine that serves ``config`` (by :meth:`EngineConfig.serves`), and a line
    when one that served it was found dead (then removed). ``served``: only engines that outside
    clients reach (``%vllm_serve --persist``). Call it holding :func:`registry_lock`."""
    root = runtime_dir()
    dead = None
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        engine = PersistedEngine.read(directory)
        if engine is None:
            if _abandoned(directory):
                shutil.rmtree(directory, ignore_errors=True)
            continue
        serves = engine.config.serves(config, lambda: engine.derived) and (engine.served or not served)
        if not engine.alive:
            if serves:
                dead = (f"the persisted engine of {engine.config.short_name} (pid {engine.pid}) had ended without "
                        "being stopped (killed or crashed; its log: " + engine.log_path + "); starting a new one")
            engine.remove()
            continue
        if serves:
            return engine, None
    return None, dead


def request_key(model: Any, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A load request as given (model and engine arguments), normalized without vLLM: a local
    directory by its absolute path, the demo model as None, values as JSON has them."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if model and os.path.exists(os.path.expanduser(str(model))):
        model = str(Path(str(model)).expanduser().resolve())
    kwargs = {k: v for k, v in engine_kwargs.items() if v is not None and k != "model"}
    return {"model": model or None, "kwargs": json.loads(json.dumps(kwargs, sort_keys=True, default=str))}


def find_request(request: dict[str, Any] | None = None, words: list[str] | None = None,
                 model: Any = None) -> PersistedEngine | None:
    """A running persisted engine started by exactly this request (from Python: ``request``; from
    a ``%vllm_load`` line: ``model`` and its engine flag ``words``), found without importing vLLM."""
    wanted_model = request_key(model, {})["model"]
    for engine in engines():
        if request is not None and engine.request == request:
            return engine
        if words is not None and engine.words == list(words) and engine.request.get("model") == wanted_model:
            return engine
    return None


def start(config: EngineConfig, *, idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
          server_kwargs: dict[str, Any] | None = None, host: str | None = None, port: int | None = None,
          api_key: str | None = None, request: dict[str, Any] | None = None,
          words: list[str] | None = None) -> PersistedEngine:
    """Start a persisted engine for ``config``; returns at once (see :meth:`PersistedEngine.wait_ready`).

    Without ``host`` it is private: a Unix socket in its 0700 directory where vLLM has ``--uds``, else
    127.0.0.1, with a random key either way. With ``host`` (``%vllm_serve --persist``) it listens there,
    with ``api_key`` when given. This kernel is attached from the start. Call it holding
    :func:`registry_lock`.
    """
    import psutil

    root = runtime_dir()
    directory = root / secrets.token_hex(4)
    directory.mkdir(mode=0o700)
    (directory / "kernels").mkdir(mode=0o700)
    served = host is not None
    if served:
        check_host(host, api_key)
        key = api_key
        port = pick_port(host, port)
        address, url = ["--host", host, "--port", str(port)], local_url(host, port)
    else:
        key = secrets.token_urlsafe(24)
        socket_path = directory / "engine.sock"
        if _has_uds() and len(str(socket_path)) <= _SOCKET_PATH_MAX:
            address, url = ["--uds", str(socket_path)], f"unix:{socket_path}"
        else:
            port = _free_port("127.0.0.1")
            address, url = ["--host", "127.0.0.1", "--port", str(port)], f"http://127.0.0.1:{port}"
    if key:
        fd = os.open(directory / "key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key)
    sleep_routes = (config.platform == "cuda" and url.startswith("unix:")
                    and bool(config.engine_kwargs.get("enable_sleep_mode")))
    argv, env = server_command(config, server_kwargs or {}, address, key)
    if sleep_routes:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # its /sleep and /wake_up routes; only its user reaches the socket
    served_name = (server_kwargs or {}).get("served_model_name") or config.engine_kwargs.get("served_model_name")
    model_name = (served_name[0] if isinstance(served_name, (list, tuple)) else served_name) or config.short_name
    engine = PersistedEngine(directory=directory, pid=0, create_time=0.0, config=config, url=url,
                             model_name=model_name, log_path=str(logs_dir() / f"persisted-{directory.name}.log"),
                             idle_timeout=idle_timeout, sleep_routes=sleep_routes, served=served,
                             request=request or {}, words=None if words is None else list(words))
    engine.lease()  # before it starts: its watchdog never sees it unattached while this kernel waits
    try:
        process = launch(["vllm_magic.engine.backends.persisted_process", str(directory)], argv, env,
                         EngineLog(engine.log_path))
    except BaseException:
        engine.remove()
        raise
    _CHILDREN.append(process)
    engine.pid = process.pid
    try:
        engine.create_time = psutil.Process(process.pid).create_time()
    except psutil.Error:
        engine.create_time = time.time()  # already gone: the wait for it says why
    engine.write()
    return engine


# ----- helpers ----------------------------------------------------------------------------------------

def _has_uds() -> bool:
    from ..flags import serve_has_flag

    return serve_has_flag("uds")


def _abandoned(directory: Path) -> bool:
    """A directory without a record: a start that failed before writing one (the registry is locked
    while one is written), or not ours at all (left alone)."""
    return (directory / "kernels").is_dir() and not (directory / "engine.json").exists()


def _kernel_id() -> str | None:
    """The Jupyter kernel's id (from its connection file's name), or None outside a kernel."""
    try:
        from ipykernel.kernelapp import IPKernelApp

        if not IPKernelApp.initialized():
            return None
        name = os.path.basename(IPKernelApp.instance().connection_file or "")
    except Exception:  # noqa: BLE001 - no ipykernel: a plain Python process
        return None
    return name[len("kernel-"):-len(".json")][:8] if name.startswith("kernel-") and name.endswith(".json") else None


def _reap() -> None:
    for process in list(_CHILDREN):
        if process.poll() is not None:
            _CHILDREN.remove(process)


def _release_all() -> None:
    for path in list(_LEASES):
        with contextlib.suppress(OSError):
            path.unlink()
    _LEASES.clear()


at_exit(_release_all)
