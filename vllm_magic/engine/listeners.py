"""Callbacks on finished requests, run on a thread of their own.

The engine's driver thread must only drive the engine: a listener that is slow (a widget update, a
memory probe) or that raises would otherwise delay or break every request. :class:`Listeners` hands
each finished request to a daemon thread that calls the listeners in order. A listener that raises
is reported, not swallowed: the traceback goes to the engine log and one line to stderr (which a
notebook shows), once per listener.
"""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from typing import Any, Callable

__all__ = ["Listeners"]

Listener = Callable[[Any], None]


class Listeners:
    """An ordered set of callbacks, called off the caller's thread with each notified value."""

    def __init__(self, report: Callable[[str], None] | None = None) -> None:
        self._items: list[Listener] = []
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._report = report
        self._reported: set[int] = set()

    def add(self, fn: Listener) -> None:
        with self._lock:
            self._items.append(fn)

    def remove(self, fn: Listener) -> None:
        with self._lock:
            if fn in self._items:
                self._items.remove(fn)

    def __len__(self) -> int:
        return len(self._items)

    def notify(self, value: Any) -> None:
        """Queue ``value`` for the listeners present now; returns at once.

        The listeners are taken when the value is queued, so a listener added later never sees a
        value notified before it existed; one removed in between is skipped.
        """
        with self._lock:
            if not self._items:
                return
            items = tuple(self._items)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="vllm-magic-listeners", daemon=True)
                self._thread.start()
        self._queue.put((items, value))

    def drain(self) -> None:
        """Wait until every value queued so far was handed to the listeners (tests, shutdown)."""
        done = threading.Event()
        with self._lock:
            running = self._thread is not None and self._thread.is_alive()
        if not running or threading.current_thread() is self._thread:
            return
        self._queue.put(done)
        done.wait()

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            if isinstance(entry, threading.Event):
                entry.set()
                continue
            items, value = entry
            with self._lock:
                items = [fn for fn in items if fn in self._items]
            for fn in items:
                try:
                    fn(value)
                except Exception as exc:  # noqa: BLE001 - reported below, never lost
                    self._failed(fn, exc)

    def _failed(self, fn: Listener, exc: BaseException) -> None:
        name = getattr(fn, "__qualname__", None) or repr(fn)
        if self._report is not None:
            self._report(f"listener {name} failed:\n" + "".join(traceback.format_exception(exc)).rstrip())
        key = id(getattr(fn, "__func__", fn))
        if key not in self._reported:
            self._reported.add(key)
            print(f"vllm-magic: {name} failed after a request: {type(exc).__name__}: {exc} "
                  "(%vllm_log shows the traceback; later failures of it go there only)", file=sys.stderr)
