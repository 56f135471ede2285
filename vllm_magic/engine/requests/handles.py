"""Request handles and results: what ``EngineSession.submit`` gives back.

A :class:`RequestHandle` is filled by the engine's driver thread and read by any caller: iterate it
for text deltas as they arrive, ``result()`` to wait for the final :class:`GenerationResult`,
``await handle`` / ``async for delta in handle`` from asyncio, ``abort()`` to stop it. Waiting is
interruptible: a ``KeyboardInterrupt`` while waiting aborts the request in the engine first.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

from ...errors import EngineDiedError
from .logprobs import TokenLogprobs, mean_logprob, mode_label, perplexity

__all__ = ["Completion", "GenerationResult", "RequestHandle", "EngineDiedError"]


@dataclass
class Completion:
    """One sampled answer (there are ``n`` per request)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    #: The model's thinking, apart from ``text`` (with a reasoning parser; "" otherwise).
    reasoning: str = ""
    #: Per generated token (thinking included): its log probability, rank and the top alternatives,
    #: when the request asked for ``logprobs``; None otherwise.
    logprobs: list[TokenLogprobs] | None = None


class _PromptField:
    """``GenerationResult.prompt``: a string, or a deferred text (an object with ``result()``, such
    as a server's rendering fetched on first read) resolved once, when somebody reads it. Read on
    the class it raises AttributeError, so the dataclass sees a field without a default."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> str:
        if obj is None:
            raise AttributeError(self._slot)
        value = obj.__dict__[self._slot]
        if not isinstance(value, str):
            value = obj.__dict__[self._slot] = value.result()
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self._slot] = value


@dataclass
class GenerationResult:
    """The final state of one request.

    ``ttft`` is the time from submission to the first generated text, in seconds;
    ``tokens_per_second`` is the decode rate after the first token (output tokens / elapsed time
    when only one token was produced).
    """

    request_id: str
    #: The exact text sent, after the chat template (a server's rendering is fetched on first read).
    prompt: str = _PromptField()  # type: ignore[assignment]
    prompt_token_ids: list[int]
    completions: list[Completion]
    ttft: float | None
    elapsed: float
    aborted: bool = False
    error: str | None = None
    parsed: Any = None
    #: Per prompt token (None for the first, which nothing predicts), when the request asked for
    #: ``prompt_logprobs``; None otherwise.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    #: Prompt tokens served from vLLM's prefix cache (None where the engine does not say).
    cached_tokens: int | None = None
    #: vLLM's ``logprobs_mode`` of the engine: which probabilities the logprobs are (None: a server's).
    logprobs_mode: str | None = None
    #: The LoRA adapter that answered (its registered name), or None for the model without one.
    lora: str | None = None

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        """The first completion's per-token logprobs (None unless the request asked for them)."""
        return self.completions[0].logprobs if self.completions else None

    @property
    def mean_logprob(self) -> float | None:
        """The mean log probability of the first completion's tokens (None without logprobs)."""
        return mean_logprob(self.logprobs or ())

    @property
    def perplexity(self) -> float | None:
        """``exp(-mean logprob)`` of the first completion's tokens (None without logprobs)."""
        return perplexity(self.logprobs or ())

    @property
    def prompt_perplexity(self) -> float | None:
        """The perplexity of the prompt's tokens under the model (None without prompt logprobs)."""
        return perplexity(self.prompt_logprobs or ())

    @property
    def logprobs_kind(self) -> str:
        """Which probabilities :attr:`logprobs` are, in words (raw or after temperature and top-p)."""
        return mode_label(self.logprobs_mode)

    @property
    def text(self) -> str:
        return self.completions[0].text if self.completions else ""

    @property
    def token_ids(self) -> list[int]:
        return self.completions[0].token_ids if self.completions else []

    @property
    def reasoning(self) -> str:
        """The first completion's thinking, kept apart from :attr:`text` by the session's
        reasoning parser ("" without one, or when the model did not think)."""
        return self.completions[0].reasoning if self.completions else ""

    @property
    def finish_reason(self) -> str | None:
        return self.completions[0].finish_reason if self.completions else None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)

    @property
    def tokens_per_second(self) -> float | None:
        tokens = self.output_tokens
        if tokens == 0 or self.elapsed <= 0:
            return None
        if self.ttft is not None and tokens > 1 and self.elapsed > self.ttft:
            return (tokens - 1) / (self.elapsed - self.ttft)
        return tokens / self.elapsed

    @property
    def summary(self) -> str:
        """The stats line every front-end shows: ``9 tokens · TTFT 45 ms · 38.2 tok/s``, plus
        ``⏹ interrupted`` or ``stopped at max tokens`` when that is how the answer ended."""
        parts = [f"{self.output_tokens} token{'s' if self.output_tokens != 1 else ''}"]
        if self.lora:
            parts.insert(0, f"adapter {self.lora}")
        if self.ttft is not None:
            parts.append(f"TTFT {self.ttft * 1000:.0f} ms")
        rate = self.tokens_per_second
        if rate is not None:
            parts.append(f"{rate:.1f} tok/s")
        perplexity = self.perplexity
        if perplexity is not None:
            parts.append(f"perplexity {perplexity:.2f}")
        if self.cached_tokens:
            parts.append(f"{self.cached_tokens} of {self.prompt_tokens} prompt tokens cached")
        if self.aborted:
            parts.append("⏹ interrupted")
        elif self.finish_reason == "length":
            parts.append("stopped at max tokens")
        return " · ".join(parts)

    def __str__(self) -> str:
        return self.text


_POLL = 0.05  # seconds between wake-ups while waiting, so Ctrl-C is handled promptly


class RequestHandle:
    """A live request: written by its backend (:meth:`push`, :meth:`finish`), read from any thread
    or event loop."""

    def __init__(self, request_id: str, prompt: Any, prompt_token_ids: list[int], n: int,
                 abort: Callable[[str], None], parse: Callable[[str], Any] | None = None,
                 sampling_params: Any = None, splitter: Any = None, logprobs_mode: str | None = None,
                 lora: str | None = None) -> None:
        self.request_id = request_id
        #: The LoRA adapter it runs with (its registered name), or None.
        self.lora = lora
        #: The ``SamplingParams`` the engine runs this request with.
        self.sampling_params = sampling_params
        self._prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.submitted_at = time.perf_counter()
        self.logprobs_mode = logprobs_mode
        self._prompt_logprobs: list[TokenLogprobs | None] | None = None
        self._cached_tokens: int | None = None
        #: Whether the engine's word on the prompt (:meth:`note_prompt`) arrived: it comes once, first.
        self.prompt_noted = False
        self._completions = [Completion(index=i) for i in range(n)]
        # (completion index, text, whether it is reasoning) in arrival order
        self._deltas: list[tuple[int, str, bool]] = []
        #: Splits reasoning from the answer (:class:`~vllm_magic.engine.requests.reasoning.ReasoningSplitter`).
        self._splitter = splitter
        self._first_token_at: float | None = None
        self._finished_at: float | None = None
        self._aborted = False
        self._error: BaseException | None = None
        self._abort = abort
        self._parse = parse
        self._cond = threading.Condition()
        # Waiters for the next delta, and waiters for the end only (``await handle``): the latter
        # are not woken per delta, so awaiting many handles costs nothing while they stream.
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._async_done_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    # ----- written by the backend (its driver thread, or its HTTP loop) ---------------------------
    def note_prompt(self, prompt_logprobs: list[TokenLogprobs | None] | None = None,
                    cached_tokens: int | None = None) -> None:
        """Record what the engine says about the prompt: its logprobs, its tokens served from cache."""
        with self._cond:
            if prompt_logprobs is not None:
                self._prompt_logprobs = list(prompt_logprobs)
            if cached_tokens is not None:
                self._cached_tokens = int(cached_tokens)
            self.prompt_noted = True

    def push(self, index: int, text: str, token_ids: list[int], finish_reason: str | None,
             logprobs: list[TokenLogprobs] | None = None) -> None:
        """Add completion ``index``'s next text and token ids (``finish_reason`` when it ended), and
        their logprobs where the request asked for them."""
        with self._cond:
            if self._finished_at is not None:
                return
            if self._first_token_at is None and (text or token_ids):
                self._first_token_at = time.perf_counter()
            completion = self._completions[index] if index < len(self._completions) else None
            if completion is None:
                completion = Completion(index=index)
                self._completions.append(completion)
            if self._splitter is not None:
                reasoning, text = self._splitter.feed(index, text, token_ids)
                if reasoning:
                    completion.reasoning += reasoning
                    self._deltas.append((index, reasoning, True))
            completion.text += text
            completion.token_ids.extend(token_ids)
            if logprobs is not None:
                if completion.logprobs is None:
                    completion.logprobs = []
                completion.logprobs.extend(logprobs)
            if finish_reason is not None:
                completion.finish_reason = finish_reason
                if self._splitter is not None:  # the parser's split of the whole answer is the final word
                    completion.reasoning, completion.text = self._splitter.settle(index)
            if text:
                self._deltas.append((index, text, False))
        self._notify()

    def finish(self, *, aborted: bool = False, error: BaseException | None = None,
               then: Callable[["RequestHandle"], None] | None = None) -> None:
        """Mark the request finished (aborted, or failed with ``error``); a second call does nothing. ``then(handle)`` runs before any waiter can see it finished
        (the session counts it there, so a caller that got the result sees the counters include it)."""
        with self._cond:
            if self._finished_at is not None:
                return
            self._finished_at = time.perf_counter()
            self._aborted = aborted
            self._error = error
            if aborted:
                for c in self._completions:
                    c.finish_reason = c.finish_reason or "abort"
            if then is not None:
                try:
                    then(self)  # the condition's lock is reentrant: ``then`` may read the handle
                except Exception:  # noqa: BLE001 - a bookkeeping bug must not stop the engine's thread
                    traceback.print_exc()
        self._notify(finished=True)

    def _notify(self, finished: bool = False) -> None:
        with self._cond:
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
            if finished:
                waiters += self._async_done_waiters
                self._async_done_waiters = []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # the loop was closed meanwhile
                pass

    # ----- read by callers -------------------------------------------------------------------
    @property
    def prompt(self) -> str:
        """The exact text sent, after the chat template. A server elsewhere renders it: reading it
        the first time asks the server for it (a millisecond or two)."""
        text = self._prompt
        if not isinstance(text, str):
            text = self._prompt = text.result()
        return text

    @property
    def done(self) -> bool:
        return self._finished_at is not None

    @property
    def text(self) -> str:
        """Text of the first completion generated so far."""
        return self._completions[0].text

    def abort(self) -> None:
        """Stop the request in the engine; what was generated so far stays in the result."""
        if not self.done:
            self._abort(self.request_id)

    def _wait_for(self, cursor: int, timeout: float | None) -> bool:
        """Block until there are deltas past ``cursor`` or the request ended; Ctrl-C aborts."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with self._cond:
                while len(self._deltas) <= cursor and self._finished_at is None:
                    remaining = _POLL if deadline is None else min(_POLL, deadline - time.monotonic())
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
            return True
        except KeyboardInterrupt:
            self.abort()
            raise

    @property
    def delta_count(self) -> int:
        """How many text deltas arrived so far (for :meth:`wait_for_delta`)."""
        return len(self._deltas)

    def wait_for_delta(self, after: int = 0, timeout: float | None = None) -> bool:
        """Block until more than ``after`` text deltas arrived or the request ended.

        Returns False when ``timeout`` seconds passed first. Ctrl-C while waiting aborts the request.
        """
        return self._wait_for(after, timeout)

    def iter_deltas(self, timeout: float | None = None) -> Iterator[tuple[int, str]]:
        """Yield ``(completion_index, text)`` deltas of the answers as they arrive, until the
        request ends (reasoning apart: :meth:`iter_parts`)."""
        for index, text, reasoning in self.iter_parts(timeout):
            if not reasoning:
                yield index, text

    def iter_parts(self, timeout: float | None = None) -> Iterator[tuple[int, str, bool]]:
        """Yield ``(completion_index, text, is_reasoning)`` deltas as they arrive: the answers and,
        with a reasoning parser, the thinking before them."""
        cursor = 0
        while True:
            if not self._wait_for(cursor, timeout):
                raise TimeoutError(f"request {self.request_id} produced nothing for {timeout} s")
            fresh, cursor, finished = self._take(cursor)
            yield from fresh
            if finished and cursor == len(self._deltas):
                self._raise_error()
                return

    def _take(self, cursor: int) -> tuple[list[tuple[int, str, bool]], int, bool]:
        """The deltas past ``cursor``, the new cursor, and whether the request had ended then."""
        with self._cond:
            return self._deltas[cursor:], len(self._deltas), self._finished_at is not None

    def __iter__(self) -> Iterator[str]:
        """Text deltas of the first completion (index 0) as they arrive."""
        for index, text in self.iter_deltas():
            if index == 0:
                yield text

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the request to end and return its result."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
            self._wait_for(len(self._deltas), left)
        self._raise_error()
        return self.snapshot()

    def snapshot(self) -> GenerationResult:
        """The result as it stands now (complete once ``done``)."""
        prompt = self._prompt  # the text, or a server's rendering that the result fetches when read
        if not isinstance(prompt, str) and not (self.done or prompt.done()):
            prompt = ""  # a running request's snapshot never waits for a server's rendering
        with self._cond:
            end = self._finished_at or time.perf_counter()
            ttft = None if self._first_token_at is None else self._first_token_at - self.submitted_at
            completions = [Completion(c.index, c.text, list(c.token_ids), c.finish_reason, c.reasoning,
                                      None if c.logprobs is None else list(c.logprobs))
                           for c in self._completions]
            result = GenerationResult(
                request_id=self.request_id, prompt=prompt, prompt_token_ids=list(self.prompt_token_ids),
                completions=completions, ttft=ttft, elapsed=end - self.submitted_at, aborted=self._aborted,
                error=None if self._error is None else str(self._error),
                prompt_logprobs=None if self._prompt_logprobs is None else list(self._prompt_logprobs),
                cached_tokens=self._cached_tokens, logprobs_mode=self.logprobs_mode, lora=self.lora)
        if self._parse is not None and self.done and not self._aborted and result.text:
            try:
                result.parsed = self._parse(result.text)
            except Exception:  # an unparseable answer stays available as text
                result.parsed = None
        return result

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # ----- asyncio ---------------------------------------------------------------------------
    async def _async_wait(self, cursor: int, until_done: bool = False) -> None:
        loop = asyncio.get_running_loop()
        while True:
            future = loop.create_future()
            with self._cond:
                if self._finished_at is not None or (not until_done and len(self._deltas) > cursor):
                    return
                (self._async_done_waiters if until_done else self._async_waiters).append((loop, future))
            try:
                await future
            except asyncio.CancelledError:
                self.abort()
                raise

    async def __aiter__(self) -> AsyncIterator[str]:
        """``async for delta in handle``: text deltas of the first completion's answer."""
        async for text, reasoning in self.aiter_parts():
            if not reasoning:
                yield text

    async def aiter_parts(self) -> AsyncIterator[tuple[str, bool]]:
        """``(text, is_reasoning)`` deltas of the first completion, as :meth:`iter_parts`."""
        cursor = 0
        while True:
            await self._async_wait(cursor)
            fresh, cursor, finished = self._take(cursor)
            for index, text, reasoning in fresh:
                if index == 0:
                    yield text, reasoning
            if finished and cursor == len(self._deltas):
                self._raise_error()
                return

    async def aresult(self) -> GenerationResult:
        """Await the final result without blocking the event loop."""
        while not self.done:
            await self._async_wait(0, until_done=True)
        self._raise_error()
        return self.snapshot()

    def __await__(self):
        return self.aresult().__await__()

    def __repr__(self) -> str:
        state = "aborted" if self._aborted else ("done" if self.done else "running")
        return f"<RequestHandle {self.request_id} {state} {len(self.text)} chars>"


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
