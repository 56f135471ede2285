"""Engine processes that belong to their kernel: deaf to its interrupts, gone when it dies.

vLLM runs its engine in child processes (EngineCore and its workers). Left as they are, they share
the kernel's process group, so the interrupt button, which signals the whole group (jupyter_client
sends SIGINT with ``killpg``), or Ctrl-C in a terminal kills the engine instead of stopping one
request; and when the kernel dies hard (SIGKILL, the OOM killer) they live on as orphans holding
RAM or GPU memory.

While :func:`engine_processes_guarded` is active, every process started through ``multiprocessing``
runs :func:`_guarded_child` first, which

* starts a new session (``setsid``): the engine and the workers it starts leave the kernel's process
  group, so an interrupt reaches only the kernel, which aborts the request in the engine;
* watches the kernel: when it is gone, the engine is asked to shut down (SIGTERM, the way vLLM
  expects to be stopped) and, if it has not exited a few seconds later, its whole session is killed;
* in a spawned child, freezes what the child imported before it runs (the collector is paused while
  the child imports vLLM and torch, which made that import a quarter slower).

SIGINT is blocked in the starting thread while a child is launched (a signal mask survives fork and
exec), so an interrupt that arrives before the child has left the group stays pending there and is
discarded once it has; the kernel still receives it. On Linux the parent's exit is noticed at once
through a pidfd; elsewhere the parent process id is polled twice a second. On platforms without
``setsid`` (Windows) nothing changes.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import multiprocessing.process
import os
import select
import signal
import threading
import time
from typing import Any, Callable, Iterable, Iterator

__all__ = ["engine_processes_guarded", "end_processes", "watch_parent", "kill_group_later", "at_exit"]

#: Seconds an engine gets to shut down after its kernel died before its session is killed.
SHUTDOWN_GRACE = 5.0

_lock = threading.Lock()
_active = 0
_original_start: Callable[[Any], None] | None = None


@contextlib.contextmanager
def engine_processes_guarded() -> Iterator[None]:
    """Guard every process that ``multiprocessing`` starts in this process while the block runs."""
    global _active
    if not hasattr(os, "setsid"):  # pragma: no cover - Windows: no sessions, no process groups
        yield
        return
    with _lock:
        _install()
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1


def _install() -> None:
    global _original_start
    if _original_start is not None:
        return
    _original_start = multiprocessing.process.BaseProcess.start
    multiprocessing.process.BaseProcess.start = _start  # type: ignore[method-assign]


def _start(self: Any) -> None:
    original = _original_start
    assert original is not None
    if not _active or getattr(self, "_target", None) is None or getattr(self, "_vllm_magic_guarded", False):
        original(self)
        return
    self._target = functools.partial(_guarded_child, os.getpid(), _CollectorPause(), self._target)
    self._vllm_magic_guarded = True
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        original(self)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class _CollectorPause:
    """Pauses the garbage collector of a spawned child while it unpickles what it runs.

    A spawned child unpickles its target (this pause comes just before it) and the target's
    arguments, which imports vLLM and torch: about a million tracked objects, which the collector
    would otherwise walk over and over while they are created.
    """

    def __reduce__(self) -> tuple[Callable[[], bool], tuple]:
        return _pause_collector, ()


def _pause_collector() -> bool:
    gc.disable()
    return True


def _guarded_child(parent_pid: int, collector_pause: Any, target: Callable[..., Any], *args: Any,
                   **kwargs: Any) -> Any:
    """Runs first in a guarded child: leave the kernel's process group, watch the kernel, run ``target``."""
    # A spawned child unpickled the pause (True); a forked one received the marker object itself.
    if collector_pause is True:
        # What exists now is the imported code and the configuration: static for the engine's life,
        # so it is frozen out of collection (vLLM freezes its heap the same way once the engine is up).
        gc.freeze()
        gc.enable()
    try:
        os.setsid()
    except OSError:  # already a session leader
        pass
    # An interrupt sent to the kernel's group before setsid is pending here: drop it, then take
    # SIGINT again as Python does (vLLM installs its own handlers later).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=watch_parent, args=(parent_pid,), name="vllm-magic-parent-watch", daemon=True).start()
    return target(*args, **kwargs)


def watch_parent(parent_pid: int) -> None:
    """Wait for the process ``parent_pid`` (the kernel) to exit, then end this process's group:
    SIGTERM to this process first (vLLM stops its engine core and workers on it), SIGKILL to the
    whole group :data:`SHUTDOWN_GRACE` seconds later. This process must lead its own group."""
    _wait_for_exit(parent_pid)
    group = os.getpgid(0)
    # The group kill must also happen when this process exits sooner, as vLLM's shutdown makes it do:
    # what it leaves in the group (torch's compile workers notice a dead parent only once a minute)
    # would outlive the kernel. A small process of the group does it; it ends with the group.
    kill_group_later(group, SHUTDOWN_GRACE)
    # The kernel is gone: shut the engine down the way vLLM expects (its SIGTERM handler stops the
    # engine core and its workers), then make sure of it.
    with contextlib.suppress(OSError):
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(SHUTDOWN_GRACE)
    with contextlib.suppress(OSError):
        os.killpg(group, signal.SIGKILL)


def kill_group_later(group: int, seconds: float) -> None:
    """SIGKILL to process group ``group`` in ``seconds``, from a small process of that group."""
    import subprocess
    import sys

    code = f"import os, signal, time; time.sleep({seconds}); os.killpg({group}, signal.SIGKILL)"
    with contextlib.suppress(OSError):
        subprocess.Popen([sys.executable, "-I", "-S", "-c", code], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)


def _wait_for_exit(parent_pid: int) -> None:
    """Return once the process ``parent_pid`` (our parent when we started) has exited."""
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(parent_pid)
        except OSError:  # already gone, or no pidfd support in this kernel
            pidfd = None
    if os.getppid() != parent_pid:  # reparented: the parent exited before we looked
        if pidfd is not None:
            os.close(pidfd)
        return
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while not poller.poll():
            pass
        os.close(pidfd)
        return
    while os.getppid() == parent_pid:  # pragma: no cover - kernels without pidfd
        time.sleep(0.5)


def end_processes(pids: Iterable[int], *, ask: bool, grace: float) -> int:
    """Wait up to ``grace`` seconds for processes to exit (first asking them with SIGTERM when ``ask``),
    kill those still alive, and reap them.

    Returns how many had to be killed. Processes that are not our descendants are left alone.
    """
    import psutil

    mine = {p.pid: p for p in psutil.Process().children(recursive=True)}
    procs = [mine[pid] for pid in pids if pid in mine]
    if not procs:
        return 0
    if ask:
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(alive)


def at_exit(fn: Callable[[], Any]) -> None:
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
