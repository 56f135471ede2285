"""The one thread that owns a vLLM engine.

vLLM's ``LLMEngine`` is not thread-safe, so every call into it (``add_request``, ``step``,
``abort_request``) happens on this thread. Callers talk to it through a command queue; outputs come
back as DELTA ``RequestOutput``s and are fanned out to each request's :class:`RequestHandle` by
request id. Outputs for ids it no longer knows (requests that were aborted) are dropped, so nothing
leaks into later results.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from ..compat import abort_requests
from ...errors import EngineDiedError
from ..requests.handles import RequestHandle
from ..requests.logprobs import from_vllm_positions

__all__ = ["EngineDriver"]


#: How long an abort waits for the engine to drop its requests. An abort is handled between two
#: engine steps, at once on an idle machine; on a 2-core machine running several engines a 5 s wait
#: was sometimes too short, and an interrupted request was still running when the caller returned.
#: The bound only matters for an engine that stopped stepping altogether.
ABORT_WAIT = 60.0


class EngineDriver:
    """Runs ``add_request``/``step``/``abort_request`` for one engine on a dedicated thread."""

    def __init__(self, engine: Any, on_finished: Callable[[RequestHandle], None] | None = None) -> None:
        self._engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, RequestHandle] = {}
        self._on_finished = on_finished
        self.dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vllm-magic-engine-driver", daemon=True)
        self._thread.start()

    # ----- called from any thread --------------------------------------------------------------
    def add(self, items: list[tuple[RequestHandle, Any, Any, Any]]) -> None:
        """Queue ``(handle, prompt, sampling_params, lora_request)`` items (the last None for no
        adapter); all join the engine before its next step."""
        self._check_alive()
        self._commands.put(("add", items))

    def abort(self, request_ids: list[str], wait: float = ABORT_WAIT) -> None:
        """Abort requests and wait until the engine has dropped them (at most ``wait`` seconds)."""
        if self.dead is not None or not self._thread.is_alive():
            return
        done = threading.Event()
        self._commands.put(("abort", (list(request_ids), done)))
        if threading.current_thread() is not self._thread:
            done.wait(wait)

    def abort_all(self, wait: float = ABORT_WAIT) -> int:
        """Abort every live request; returns how many there were."""
        ids = list(self._live)
        self.abort(ids, wait)
        return len(ids)

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(engine)`` on the driver thread between steps and return its value."""
        self._check_alive()
        future: Future = Future()
        self._commands.put(("call", (fn, future)))
        return future.result()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is live and end the thread (safe to call twice)."""
        if self._thread.is_alive():
            self._commands.put(("stop", None))
            self._thread.join(timeout)

    @property
    def live_count(self) -> int:
        return len(self._live)

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise EngineDiedError(f"the engine died ({self.dead}); run %vllm_load again") from None
        if not self._thread.is_alive():
            raise EngineDiedError("the engine was shut down; load it again")

    # ----- the driver thread -------------------------------------------------------------------
    def _run(self) -> None:
        engine = self._engine
        try:
            while True:
                busy = bool(self._live) or engine.has_unfinished_requests()
                try:
                    command = self._commands.get(block=not busy)
                except queue.Empty:
                    command = None
                while command is not None:
                    if not self._handle(command):
                        self._close_all(EngineDiedError("the engine was shut down"), aborted=True)
                        return
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        command = None
                if engine.has_unfinished_requests():
                    self._dispatch(engine.step())
                elif self._live:
                    # Requests the engine no longer knows about (rejected late): close them.
                    for handle in list(self._live.values()):
                        self._finish(handle, aborted=True)
        except BaseException as exc:  # the engine core died or raised: nothing can run any more
            self.dead = exc
            self._close_all(EngineDiedError(f"the engine died: {type(exc).__name__}: {exc}"))
            while True:  # answer pending callers instead of leaving them hanging
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    return
                self._refuse(command)

    def _handle(self, command: tuple[str, Any]) -> bool:
        kind, payload = command
        engine = self._engine
        if kind == "add":
            for handle, prompt, params, lora in payload:
                try:
                    if lora is None:
                        engine.add_request(handle.request_id, prompt, params)
                    else:
                        engine.add_request(handle.request_id, prompt, params, lora_request=lora)
                except Exception as exc:  # a bad request fails alone; the engine keeps serving
                    handle.finish(error=ValueError(str(exc)))
                    continue
                self._live[handle.request_id] = handle
        elif kind == "abort":
            ids, done = payload
            live = [i for i in ids if i in self._live]
            try:
                abort_requests(engine, live)
            finally:
                for request_id in live:
                    self._finish(self._live[request_id], aborted=True)
                done.set()
        elif kind == "call":
            fn, future = payload
            try:
                future.set_result(fn(engine))
            except BaseException as exc:
                future.set_exception(exc)
        elif kind == "stop":
            ids = list(self._live)
            if ids:
                abort_requests(engine, ids)
            return False
        return True

    def _refuse(self, command: tuple[str, Any]) -> None:
        kind, payload = command
        error = EngineDiedError(f"the engine died ({self.dead}); run %vllm_load again")
        if kind == "add":
            for handle, *_ in payload:
                handle.finish(error=error)
        elif kind == "abort":
            payload[1].set()
        elif kind == "call":
            payload[1].set_exception(error)

    def _dispatch(self, outputs: list[Any]) -> None:
        for output in outputs:
            handle = self._live.get(output.request_id)
            if handle is None:
                continue  # a leftover of an aborted request
            params = handle.sampling_params
            for completion in output.outputs:
                token_ids = list(completion.token_ids or ())
                logprobs = completion.logprobs
                if logprobs is not None:  # asked for: the positions of this delta's tokens
                    logprobs = from_vllm_positions(token_ids, logprobs, getattr(params, "logprobs", None))
                handle.push(completion.index, completion.text, token_ids, completion.finish_reason, logprobs)
            if not handle.prompt_noted:
                prompt_logprobs = getattr(output, "prompt_logprobs", None)
                handle.note_prompt(
                    None if not prompt_logprobs else from_vllm_positions(
                        handle.prompt_token_ids, prompt_logprobs, getattr(params, "prompt_logprobs", None)),
                    getattr(output, "num_cached_tokens", None))
            if output.finished:
                self._finish(handle)

    def _finish(self, handle: RequestHandle, *, aborted: bool = False) -> None:
        self._live.pop(handle.request_id, None)
        handle.finish(aborted=aborted, then=self._on_finished)

    def _close_all(self, error: BaseException, aborted: bool = False) -> None:
        for handle in list(self._live.values()):
            self._live.pop(handle.request_id, None)
            if aborted:
                handle.finish(aborted=True)
            else:
                handle.finish(error=error)
