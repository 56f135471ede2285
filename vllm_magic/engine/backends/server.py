"""vLLM's OpenAI-compatible server, started and owned by the kernel: ``%vllm_serve``.

:meth:`ManagedServer.start` runs ``vllm serve`` (through :mod:`.server_process`) with the same engine
arguments and platform defaults as ``%vllm_load``, in a process group of its own that is bound to the
kernel's life: it stops with :meth:`~ManagedServer.stop`, when the kernel exits, and when the kernel
is killed, leaving no process behind. Its log is a file of its own (``%vllm_serve --logs``).

The server listens on the loopback interface unless told otherwise; another address without an
API key is refused, because anyone who can reach it could use the model.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import weakref
from typing import Any, Callable

from ...errors import ConfigError, ServerError
from ...paths import logs_dir
from ..config import EngineConfig
from ..flags import serve_cli_flags
from ..log import EngineLog
from ..platform import THREADS_BIND_VARIABLE
from .processes import at_exit

__all__ = ["ManagedServer", "LOOPBACK_HOSTS", "DEFAULT_PORT",
           "READY_TIMEOUT"]

#: Hosts that only this machine reaches.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: vLLM's own default port; taken when free, else a free port is picked.
DEFAULT_PORT = 8000
#: Seconds a server gets to answer ``/health`` after it was started (a large model on a slow disk).
READY_TIMEOUT = 900.0
#: Seconds a stopping server gets before its processes are killed.
STOP_GRACE = 20.0
#: How often ``/health`` is asked while a server starts (vLLM's own tests poll as often).
_POLL = 0.5


# ----- the server ----------------------------------------------------------------------------------

class ManagedServer:
    """One ``vllm serve`` process group that this kernel started and owns."""

    def __init__(self, config: EngineConfig, server_kwargs: dict[str, Any], host: str, port: int,
                 api_key: str | None, process: subprocess.Popen, log: EngineLog, argv: list[str]) -> None:
        self.config = config
        self.server_kwargs = dict(server_kwargs)
        self.host = host
        self.port = port
        self.api_key = api_key
        self.process = process
        self.log = log
        self.argv = argv
        self.started = time.monotonic()
        self.ready_seconds: float | None = None
        served = server_kwargs.get("served_model_name") or config.engine_kwargs.get("served_model_name")
        #: The name clients send as ``model``.
        self.model_name = (served[0] if isinstance(served, (list, tuple)) else served) or config.short_name
        self._finalizer = weakref.finalize(self, _stop_group, process, STOP_GRACE)
        _SERVERS.add(self)

    # ----- starting ----------------------------------------------------------------------------
    @classmethod
    def start(cls, config: EngineConfig, *, host: str = "127.0.0.1", port: int | None = None,
              api_key: str | None = None, server_kwargs: dict[str, Any] | None = None) -> "ManagedServer":
        """Start ``vllm serve`` for ``config``; returns at once (see :meth:`wait_ready`)."""
        server_kwargs = dict(server_kwargs or {})
        for key in ("host", "port", "api_key"):
            if key in server_kwargs:
                raise ConfigError(f"give --{key.replace('_', '-')} as %vllm_serve's own flag")
        check_host(host, api_key)
        port = pick_port(host, port)
        argv, env = server_command(config, server_kwargs, ["--host", host, "--port", str(port)], api_key)
        log = EngineLog(logs_dir() / f"server-{os.getpid()}-{port}.log")
        process = launch(["vllm_magic.engine.backends.server_process", str(os.getpid())], argv, env, log)
        return cls(config, server_kwargs, host, port, api_key, process, log, argv)

    def wait_ready(self, timeout: float = READY_TIMEOUT,
                   progress: Callable[[str, float], None] | None = None) -> float:
        """Wait until the server answers ``/health``; returns the seconds since it was started.

        Raises :class:`ServerError` with the root cause from the server's log when it exits first
        or does not answer within ``timeout`` seconds (it is stopped then); Ctrl-C stops it too.
        """
        import httpx

        try:
            with self.log.follow(progress), httpx.Client(timeout=2.0) as client:
                while True:
                    code = self.process.poll()
                    if code is not None:
                        raise ServerError(self._failure(f"exited while starting (exit code {code})"))
                    try:
                        if client.get(f"{self.url}/health").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass  # not listening yet
                    if time.monotonic() - self.started > timeout:
                        raise ServerError(self._failure(f"did not answer /health within {timeout:.0f} s"))
                    time.sleep(_POLL)
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.monotonic() - self.started
        return self.ready_seconds

    def _failure(self, what: str) -> str:
        reasons = self.log.errors_since(0, limit=4)
        cause = "\n".join(reasons) if reasons else "(its log names no error)"
        return (f"vLLM's server for {self.config.short_name} {what}:\n{cause}\n"
                f"%vllm_serve --logs shows its log ({self.log.path}).")

    # ----- state -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Where clients on this machine reach it (``http://127.0.0.1:8000``)."""
        return local_url(self.host, self.port)

    @property
    def base_url(self) -> str:
        """The OpenAI clients' ``base_url``."""
        return self.url + "/v1"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def processes(self) -> list[Any]:
        """The processes of its group still running (the server, vLLM's engine core, its workers)."""
        return _group_processes(self.process.pid)

    def stop(self, grace: float = STOP_GRACE) -> int:
        """Stop the server and everything it started; returns how many processes had to be killed."""
        _SERVERS.discard(self)
        self._finalizer.detach()
        return _stop_group(self.process, grace)

    def client_snippet(self) -> str:
        """Ready-to-run code for the official ``openai`` client against this server."""
        return client_snippet(self.base_url, self.model_name, self.api_key)

    def describe(self) -> str:
        state = "running" if self.alive else f"exited (code {self.process.returncode})"
        return (f"{self.model_name} served at {self.base_url} · {state} · pid {self.process.pid}, "
                f"{len(self.processes())} process(es) · up {time.monotonic() - self.started:.0f} s · "
                f"log {self.log.path}")

    def __repr__(self) -> str:
        return f"<ManagedServer {self.model_name} at {self.url} {'running' if self.alive else 'stopped'}>"


def local_url(host: str, port: int) -> str:
    """Where clients on this machine reach a server listening on ``host``:``port``."""
    host = "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else ("::1" if host == "::" else host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def client_snippet(base_url: str, model_name: str, api_key: str | None) -> str:
    """Ready-to-run code for the official ``openai`` client against a server."""
    key = api_key and "os.environ[\"VLLM_API_KEY\"]"
    lines = ["from openai import OpenAI", ""]
    if key:
        lines.insert(0, "import os")
    lines += [f'client = OpenAI(base_url="{base_url}", api_key={key or chr(34) + "EMPTY" + chr(34)})',
              f'reply = client.chat.completions.create(model="{model_name}", '
              'messages=[{"role": "user", "content": "Hello!"}])',
              "print(reply.choices[0].message.content)"]
    return "\n".join(lines)


def server_command(config: EngineConfig, server_kwargs: dict[str, Any], address: list[str],
                   api_key: str | None) -> tuple[list[str], dict[str, str]]:
    """``vllm serve`` arguments and environment for ``config`` listening at ``address`` (its flags)."""
    server_kwargs = dict(server_kwargs)
    if not config.engine_kwargs.get("served_model_name"):  # clients name it as people do, not by its path
        server_kwargs.setdefault("served_model_name", [config.short_name])
    # Its answers' usage then says how many prompt tokens the prefix cache served (the stats line shows it).
    server_kwargs.setdefault("enable_prompt_tokens_details", True)
    from .. import gpu_memory

    plan = gpu_memory.plan(config)  # a shared GPU: sized as in-kernel engines are; DoesNotFit in one line
    engine = {k: v for k, v in config.llm_kwargs().items() if k != "model"}
    flags = serve_cli_flags({**engine, **(plan.engine_kwargs() if plan else {}), **server_kwargs})
    argv = ["--model", config.files, *flags, *address]
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key  # not on the command line, where `ps` shows it to everyone
    if config.cpu_threads:
        env[THREADS_BIND_VARIABLE] = config.cpu_threads
    if config.engine_kwargs.get("enable_lora"):
        # Its /v1/load_lora_adapter route: %vllm_lora registers adapters with a server this user started.
        env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    return argv, env


def launch(entry: list[str], argv: list[str], env: dict[str, str], log: EngineLog) -> subprocess.Popen:
    """Run ``python -m ENTRY... ARGV`` as the leader of a new session (the kernel's interrupts never
    reach it; its group is everything vLLM starts for it), writing to ``log`` (emptied first)."""
    log.path.write_text("")
    log.mark(f"vllm serve {' '.join(shlex.quote(a) for a in argv)}")
    with open(log.path, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", *entry, *argv], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def check_host(host: str, api_key: str | None) -> None:
    """Refuse an address other machines can reach unless an API key guards it."""
    if host not in LOOPBACK_HOSTS and not api_key:
        raise ConfigError(
            f"--host {host} makes the server reachable from other machines, and without an API key anyone "
            "who reaches it can use the model (and the machine's GPU). Add --api-key KEY (clients send it as "
            "their API key), or leave --host out to serve on 127.0.0.1, this machine only.")


def pick_port(host: str, port: int | None) -> int:
    """``port`` when it is free on ``host`` (0 or None: 8000 when free, else any free port)."""
    if port:
        if not _port_free(host, port):
            raise ConfigError(f"port {port} is in use on {host}: pick another with --port, or leave --port out")
        return port
    if port is None and _port_free(host, DEFAULT_PORT):
        return DEFAULT_PORT
    return _free_port(host)


def _bind_host(host: str) -> tuple[int, str]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, ("::1" if host == "::1" else "127.0.0.1" if host == "localhost" else host)


def _port_free(host: str, port: int) -> bool:
    family, address = _bind_host(host)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    family, address = _bind_host(host)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def _group_processes(pgid: int) -> list[Any]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def _stop_group(process: subprocess.Popen, grace: float) -> int:
    """SIGTERM to the server (vLLM stops its engine on it), then SIGKILL to whatever of its group is
    left after ``grace`` seconds; waits until the group is gone. Returns how many were killed."""
    import psutil

    pgid = process.pid
    if process.poll() is None:
        with contextlib.suppress(OSError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    left = _group_processes(pgid)
    _, left = psutil.wait_procs(left, timeout=2) if left else ([], [])
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if process.poll() is None:
        with contextlib.suppress(OSError):
            process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    psutil.wait_procs(left, timeout=10)
    return len(left)


# Servers still running; stopped when the kernel exits.
_SERVERS: "weakref.WeakSet[ManagedServer]" = weakref.WeakSet()


def _stop_running() -> None:
    for server in list(_SERVERS):
        with contextlib.suppress(Exception):
            server.stop()


at_exit(_stop_running)
