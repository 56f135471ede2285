"""One function per way of asking the engine for text, each timed the same way.

Batch functions return ``Sample(output tok/s, {"seconds", "tokens"})``; streaming functions return
``Sample(time to first text in ms, {"decode": tok/s, "tokens": n})``. "Time to first text" runs from
the call to the first non-empty text the caller sees; the decode rate is
``(output tokens - 1) / (end - first text)``. Raw vLLM runs on the session's driver thread through
``run_on_engine`` (the engine is not thread-safe), with the prompt text the front-ends' chat
template produces, so every row does the same work.

The ``%%vllm`` and LangChain rows are measured when ``vllm_magic.magics`` / ``vllm_magic.langchain``
exist; otherwise they are reported as not available.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .measure import Sample, pinned_sampling, wait_until

__all__ = ["Workload", "BATCH", "STREAM", "fresh_prefix_cache", "magics_available", "langchain_available"]

_ids = itertools.count(1)


def magics_available() -> bool:
    return importlib.util.find_spec("vllm_magic.magics") is not None


def langchain_available() -> bool:
    return importlib.util.find_spec("vllm_magic.langchain") is not None


@dataclass
class Workload:
    """The same prompts and sizes for every front-end."""

    session: Any
    prompts: list[str]  # what users type (front-ends apply the chat template)
    tokens: int  # output tokens per batch prompt (ignore_eos)
    stream_prompt: str
    stream_tokens: int
    texts: list[str] = field(default_factory=list)  # the same prompts after the chat template
    stream_text: str = ""
    _lc: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.session.loaded:  # a session without an engine (--served-only) only lends its prompts
            self.texts = [self.session.render_prompt(p) for p in self.prompts]
            self.stream_text = self.session.render_prompt(self.stream_prompt)

    @property
    def shell(self) -> "RecordingShell":
        return RecordingShell.instance()

    def langchain(self, name: str) -> Any:
        """The vllm-magic LangChain object ``name`` ("VLLM" or "ChatVLLM") bound to the live engine."""
        if name not in self._lc:
            module = importlib.import_module("vllm_magic.langchain")
            created = self.session.engines_created
            cls = getattr(module, name)
            # Bound to this session's live engine (a bare constructor would load the demo model).
            self._lc[name] = cls.from_session(self.session) if hasattr(cls, "from_session") else cls()
            if self.session.engines_created != created:
                raise RuntimeError(f"{name}() started a new engine instead of using the live one")
        return self._lc[name]


# ----- raw vLLM ------------------------------------------------------------------------------------

def fresh_prefix_cache(llm: Any) -> None:
    """Empty vLLM's prefix cache, so that the next request computes its prompt in full.

    Every timed run sends the same prompts; without this, every run after the first would find
    them computed by the one before. ``LLM.reset_prefix_cache()`` has this form from vLLM 0.26 to
    0.32 at least; it must run between engine steps (on the driver thread), and vLLM refuses while
    requests still hold cache blocks: so does this.
    """
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM did not reset its prefix cache: requests were still in the engine")


def _sampling(max_tokens: int, delta: bool = False, **extra: Any) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kind = RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, output_kind=kind, **extra)


def batch_raw_generate(w: Workload) -> Sample:
    params = _sampling(w.tokens)

    def work(llm: Any) -> tuple[float, int]:
        start = time.perf_counter()
        outputs = llm.generate(w.texts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        return seconds, sum(len(o.outputs[0].token_ids) for o in outputs)

    seconds, tokens = w.session.run_on_engine(work)
    return Sample(tokens / seconds, {"seconds": seconds, "tokens": tokens})


def stream_raw_steps(w: Workload, **extra: Any) -> Sample:
    """``add_request`` + ``step()`` on the driver thread: the floor for any streaming front-end.
    ``extra``: further sampling options (``logprobs=5``)."""
    params = _sampling(w.stream_tokens, delta=True, **extra)

    def work(llm: Any) -> tuple[float, float | None, float, int]:
        engine = llm.llm_engine
        start = time.perf_counter()
        engine.add_request(f"bench-{next(_ids)}", w.stream_text, params)
        first, tokens = None, 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                completion = output.outputs[0]
                tokens += len(completion.token_ids)
                if first is None and completion.text:
                    first = time.perf_counter()
        return start, first, time.perf_counter(), tokens

    start, first, end, tokens = w.session.run_on_engine(work)
    return _stream_sample(start, first, end, tokens)


def stream_raw_generate(w: Workload) -> Sample:
    """``LLM.generate`` cannot stream: time to first text is a 1-token generate, decode the rest."""
    one, full = _sampling(1), _sampling(w.stream_tokens)

    def work(llm: Any) -> tuple[float, float, int]:
        start = time.perf_counter()
        llm.generate([w.stream_text], one, use_tqdm=False)
        t_one = time.perf_counter() - start
        # The full generate computes the prompt again, as the 1-token one did: else the difference
        # of the two would leave part of the prompt's time out of the decode time.
        fresh_prefix_cache(llm)
        start = time.perf_counter()
        outputs = llm.generate([w.stream_text], full, use_tqdm=False)
        t_full = time.perf_counter() - start
        return t_one, t_full, len(outputs[0].outputs[0].token_ids)

    t_one, t_full, tokens = w.session.run_on_engine(work)
    return Sample(t_one * 1e3, {"decode": (tokens - 1) / max(t_full - t_one, 1e-9), "tokens": tokens,
                                "seconds": t_full})


def _stream_sample(start: float, first: float | None, end: float, tokens: int) -> Sample:
    if first is None:  # no visible text at all: fall back to the end
        first = end
    decode = (tokens - 1) / (end - first) if tokens > 1 and end > first else float("nan")
    return Sample((first - start) * 1e3, {"decode": decode, "tokens": tokens, "seconds": end - start})


# ----- the session ---------------------------------------------------------------------------------

def batch_session_submit(w: Workload) -> Sample:
    start = time.perf_counter()
    handles = w.session.submit(w.prompts, temperature=0.0, max_tokens=w.tokens, ignore_eos=True)
    for handle in handles:
        handle.result()
    end = time.perf_counter()
    return _batch_sample(handles, start, end)


def stream_session(w: Workload) -> Sample:
    start = time.perf_counter()
    handle = w.session.submit(w.stream_prompt, temperature=0.0, max_tokens=w.stream_tokens, ignore_eos=True)[0]
    first = None
    for delta in handle:
        if first is None and delta:
            first = time.perf_counter()
    end = time.perf_counter()
    sample = _stream_sample(start, first, end, handle.result().output_tokens)
    sample.extra["head_ms"] = (handle.submitted_at - start) * 1e3
    return sample


# ----- %%vllm through an InteractiveShell ------------------------------------------------------------

class _RecordingStream:
    """Stands in for sys.stdout: keeps the time of every write, like a kernel's stream would send."""

    def __init__(self, events: list) -> None:
        self.events = events

    def write(self, text: str) -> int:
        if text:
            self.events.append(time.perf_counter())
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class RecordingShell:
    """An InteractiveShell with vllm_magic loaded whose display output is timed, not printed.

    Display messages are serialized to JSON, as a kernel does before sending them. There is one
    per process (``instance()``): the InteractiveShell is a singleton, so a second recorder would
    take its display publisher away from the first.
    """

    _instance: "RecordingShell | None" = None

    @classmethod
    def instance(cls) -> "RecordingShell":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    @classmethod
    def reset(cls) -> None:
        """Forget the shell, so that whoever asks for an InteractiveShell next gets a fresh one."""
        if cls._instance is not None:
            from IPython.core.interactiveshell import InteractiveShell

            cls._instance = None
            InteractiveShell.clear_instance()

    def __init__(self) -> None:
        from IPython.core.displaypub import DisplayPublisher
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config

        events: list[float] = []
        self.events = events

        class Publisher(DisplayPublisher):
            def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
                json.dumps({"data": data, "metadata": metadata or {}, "transient": transient or {}}, default=str)
                events.append(time.perf_counter())

            def clear_output(self, wait=False):
                events.append(time.perf_counter())

        config = Config()
        config.HistoryManager.enabled = False
        InteractiveShell.clear_instance()  # a shell of our own, not whichever one exists
        self.ip = InteractiveShell.instance(config=config)
        self.ip.display_pub = Publisher(shell=self.ip, parent=self.ip)
        self.ip.extension_manager.load_extension("vllm_magic")
        from vllm_magic import get_session

        self._bound = get_session()

    def bind(self, session: Any) -> None:
        """Point the shell's magics at ``session`` (after ``--remote``, a session of its own)."""
        if session is not self._bound:
            from vllm_magic.magics import register

            register(self.ip, session=session)
            self._bound = session

    def run(self, source: str) -> tuple[float, float, list[float]]:
        """Run a cell; returns (start, end, times of display events) and raises what the cell raised."""
        start_index = len(self.events)
        saved = sys.stdout
        sys.stdout = _RecordingStream(self.events)
        try:
            start = time.perf_counter()
            result = self.ip.run_cell(source, store_history=False)
            end = time.perf_counter()
        finally:
            sys.stdout = saved
        result.raise_error()
        return start, end, self.events[start_index:]


def _pinned(w: Workload, max_tokens: int) -> Any:
    return pinned_sampling(w.session, temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _tokens_of(handles: list) -> int:
    wait_until(lambda: all(h.done for h in handles))
    return sum(h.result().output_tokens for h in handles)


def _batch_sample(handles: list, start: float, end: float) -> Sample:
    """Throughput, plus where the front-end's own time went: before the session created the first
    request (``head_ms``: parsing, chat template, tokenizing) and after the last request ended
    (``tail_ms``: collecting and rendering the answers)."""
    tokens = _tokens_of(handles)
    results = [h.result() for h in handles]
    first_submit = min(h.submitted_at for h in handles)
    last_end = max(h.submitted_at + r.elapsed for h, r in zip(handles, results))
    return Sample(tokens / (end - start), {"seconds": end - start, "tokens": tokens,
                                           "head_ms": (first_submit - start) * 1e3,
                                           "tail_ms": (end - last_end) * 1e3})


def batch_magic(w: Workload) -> Sample:
    cell = "%%vllm\n" + "\n---\n".join(w.prompts)
    w.shell.bind(w.session)
    with _pinned(w, w.tokens) as handles:
        start, end, _ = w.shell.run(cell)
    if len(handles) != len(w.prompts):
        raise RuntimeError(f"%%vllm submitted {len(handles)} requests for {len(w.prompts)} prompts")
    return _batch_sample(handles, start, end)


def stream_magic(w: Workload) -> Sample:
    w.shell.bind(w.session)
    with _pinned(w, w.stream_tokens) as handles:
        start, end, events = w.shell.run("%%vllm\n" + w.stream_prompt)
    handle = handles[0]
    result = handle.result()
    # The first display update after the first text reached the handle is what the user sees.
    first_text_at = handle.submitted_at + (result.ttft or 0.0)
    first = next((t for t in events if t >= first_text_at), None)
    sample = _stream_sample(start, first, end, result.output_tokens)
    sample.extra["head_ms"] = (handle.submitted_at - start) * 1e3
    return sample


# ----- LangChain -------------------------------------------------------------------------------------

def _timed_batch(w: Workload, what: str, call: Callable[[], list]) -> Sample:
    """Time ``call()`` (one front-end's batch over ``w.prompts``) and check it answered every prompt."""
    with _pinned(w, w.tokens) as handles:
        start = time.perf_counter()
        answers = call()
        end = time.perf_counter()
    if len(answers) != len(w.prompts):
        raise RuntimeError(f"{what} returned {len(answers)} answers for {len(w.prompts)} prompts")
    return _batch_sample(handles, start, end)


def batch_llm_batch(w: Workload) -> Sample:
    llm = w.langchain("VLLM")
    return _timed_batch(w, "llm.batch", lambda: llm.batch(w.prompts))


def batch_chat_abatch(w: Workload) -> Sample:
    chat = w.langchain("ChatVLLM")
    return _timed_batch(w, "abatch", lambda: asyncio.run(chat.abatch(w.prompts)))


def stream_llm_stream(w: Workload) -> Sample:
    llm = w.langchain("VLLM")
    with _pinned(w, w.stream_tokens) as handles:
        start = time.perf_counter()
        first = None
        for chunk in llm.stream(w.stream_prompt):
            text = chunk if isinstance(chunk, str) else getattr(chunk, "content", "") or getattr(chunk, "text", "")
            if first is None and text:
                first = time.perf_counter()
        end = time.perf_counter()
    sample = _stream_sample(start, first, end, _tokens_of(handles))
    sample.extra["head_ms"] = (handles[0].submitted_at - start) * 1e3
    return sample


# name -> (function, needs). The first entry of each list is the raw baseline.
BATCH: list[tuple[str, Callable[[Workload], Sample], Callable[[], bool] | None]] = [
    ("raw LLM.generate", batch_raw_generate, None),
    ("session.submit", batch_session_submit, None),
    ("%%vllm batch (---)", batch_magic, magics_available),
    ("LangChain llm.batch", batch_llm_batch, langchain_available),
    ("LangChain ChatVLLM.abatch", batch_chat_abatch, langchain_available),
]

STREAM: list[tuple[str, Callable[[Workload], Sample], Callable[[], bool] | None]] = [
    ("raw engine step loop", stream_raw_steps, None),
    ("raw LLM.generate", stream_raw_generate, None),
    ("session streaming", stream_session, None),
    ("%%vllm streaming", stream_magic, magics_available),
    ("LangChain llm.stream", stream_llm_stream, langchain_available),
]
