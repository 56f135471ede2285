"""What the magics show in a cell: the loading line, answers streaming in, the stats line.

In a notebook every live element is a display handle updated in place. It starts and ends as an
empty text, and the final rendering is a new output: stored notebooks then hold exactly what a
re-run produces (nbval compares the first message of an output, not its updates). Without a
frontend that can update outputs (terminal IPython), text is printed as it arrives instead.
"""

from __future__ import annotations

import html
import json
import re
import sys
import threading
import time
from typing import Any, Sequence

from IPython.core.displaypub import DisplayPublisher
from IPython.display import display

__all__ = ["LoadProgress", "AnswerStream", "stream_answers", "answer_bundle", "supports_updates"]

_EMPTY = {"text/plain": ""}
FORMATS = ("markdown", "text", "code", "json")


def supports_updates(shell: Any) -> bool:
    """Whether outputs can be updated in place (a Jupyter kernel, not a terminal)."""
    pub = getattr(shell, "display_pub", None)
    return pub is not None and type(pub) is not DisplayPublisher


class _LiveLine:
    """A display handle that shows text while something runs and is emptied at the end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._shown: Any = None
        self._handle = display(_EMPTY, raw=True, display_id=True)

    def update(self, bundle: dict) -> None:
        with self._lock:  # progress callbacks come from another thread
            if self._closed or bundle == self._shown:
                return
            self._shown = bundle
            self._handle.update(bundle, raw=True)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._shown is not None:
                    self._handle.update(_EMPTY, raw=True)


class LoadProgress:
    """One compact line while an engine starts: ``loading weights · 12 s``."""

    def __init__(self, live: bool) -> None:
        self._line = _LiveLine() if live else None

    def __call__(self, stage: str, elapsed: float) -> None:
        if self._line is not None:
            self._line.update({"text/plain": f"⏳ {stage} · {elapsed:.0f} s"})

    def close(self) -> None:
        if self._line is not None:
            self._line.close()


class GridProgress:
    """One line while a grid runs (``⏳ grid: 5 of 12 answers · 3 s``), emptied when it is done."""

    def __init__(self, grid: Any, live: bool) -> None:
        self.grid = grid
        self._line = _LiveLine() if live else None

    def wait(self) -> None:
        """Wait for every answer of the grid; Ctrl-C stops all of its requests."""
        start = time.monotonic()
        handles = [h for row in self.grid.handles for h in row]
        try:
            while True:
                done = sum(h.done for h in handles)
                if self._line is not None:
                    self._line.update({"text/plain": f"⏳ grid: {done} of {len(handles)} answers · "
                                                     f"{time.monotonic() - start:.0f} s"})
                pending = next((h for h in handles if not h.done), None)
                if pending is None:
                    break
                try:
                    pending.result(timeout=0.5)
                except TimeoutError:
                    pass
        except KeyboardInterrupt:
            self.grid.abort()
            raise
        finally:
            if self._line is not None:
                self._line.close()


# ----- answers ------------------------------------------------------------------------------------

def answer_bundle(text: str, format: str = "markdown", *, parsed: Any = None, label: str | None = None,
                  streaming: bool = False, reasoning: str = "") -> dict:
    """The mime bundle of an answer in one of :data:`FORMATS`; the model's ``reasoning`` (with a
    reasoning parser) goes above it in a collapsed block, apart from the answer."""
    plain = text
    if format == "json":
        value = parsed
        if value is None and not streaming:
            try:
                value = json.loads(text)
            except ValueError:
                value = None
        if value is not None and hasattr(value, "model_dump"):
            value = value.model_dump()
        body = json.dumps(value, indent=2, ensure_ascii=False) if value is not None else text
        plain = body
        markdown = f"```json\n{body}\n```"
    elif format == "code":
        language, code = extract_code(text)
        plain = code
        markdown = f"```{language}\n{code}\n```"
    elif format == "text":
        markdown = None
    else:
        markdown = text
    if streaming:
        plain += " ▌"
        if markdown is not None and format == "markdown":
            markdown += " ▌"
    if reasoning:
        plain = f"Thinking: {reasoning.strip()}\n---\n{plain}"
        if markdown is None:
            markdown = f"```text\n{text}\n```"
        markdown = thinking_block(reasoning, streaming and not text) + markdown
    if label:
        plain = f"{label}\n{plain}"
        if markdown is not None:
            markdown = f"**{label}**\n\n{markdown}"
    bundle = {"text/plain": plain}
    if markdown is not None:
        bundle["text/markdown"] = markdown
    return bundle


def thinking_block(reasoning: str, live: bool = False) -> str:
    """Markdown (HTML ``<details>``) of the model's thinking, collapsed under a "Thinking" summary."""
    summary = "Thinking…" if live else "Thinking"
    body = html.escape(reasoning.strip())
    return f"<details><summary>💭 {summary}</summary>\n\n<blockquote>{body}</blockquote>\n\n</details>\n\n"


_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> tuple[str, str]:
    """``(language, code)`` of an answer: its fenced blocks joined, or the whole text when it has none.

    Models often wrap code in fences and add explanations; ``--format code`` shows just the code.
    """
    blocks = _FENCE.findall(text)
    if not blocks:
        return "", text
    return blocks[0][0], "\n\n".join(code.rstrip("\n") for _, code in blocks)


class AnswerStream:
    """Shows one request's answer: live while it streams, then the final rendering and stats."""

    def __init__(self, handle: Any, format: str, *, live: bool, label: str | None = None,
                 echo: bool = False) -> None:
        self.handle = handle
        self.format = format
        self.label = label
        self.live = live
        self._line = _LiveLine() if live else None
        self._echo = echo and not live  # terminal: print deltas of a single answer as they come
        self._echoed = 0
        self._shown = ""
        self._seen_deltas = -1
        self.updates = 0

    @property
    def shown(self) -> bool:
        """Whether some text of the answer is on screen."""
        return bool(self._shown)

    def refresh(self) -> None:
        # No new text since the last look: skip the snapshot (it copies every token id so far),
        # which with hundreds of answers in a batch competes with the engine for the GIL.
        deltas = self.handle.delta_count
        if deltas == self._seen_deltas:
            return
        self._seen_deltas = deltas
        result = self.handle.snapshot()
        text = _joined(result)
        if text + result.reasoning == self._shown:
            return
        self._shown = text + result.reasoning
        self.updates += 1
        if self._line is not None:
            self._line.update(answer_bundle(text, self.format, label=self.label, streaming=True,
                                            reasoning=result.reasoning))
        elif self._echo:
            sys.stdout.write(text[self._echoed:])
            sys.stdout.flush()
            self._echoed = len(text)

    def finish(self, result: Any, *, parsed: Any = None, quiet: bool = False) -> None:
        """Replace the live view by the final rendering (and the stats line unless quiet)."""
        if self._line is not None:
            self._line.close()
        text = _joined(result)
        stats = None if quiet and not result.aborted else result.summary
        if self._echo:
            sys.stdout.write(text[self._echoed:] + "\n")
            if stats:
                sys.stdout.write(stats + "\n")
            sys.stdout.flush()
            return
        display(answer_bundle(text, self.format, parsed=parsed, label=self.label, reasoning=result.reasoning),
                raw=True)
        if stats:
            display({"text/plain": stats}, raw=True)

    def discard(self) -> None:
        if self._line is not None:
            self._line.close()


def _joined(result: Any) -> str:
    """The text to show: the answer, or every completion of ``-n`` one after the other."""
    completions = result.completions
    if len(completions) <= 1:
        return result.text
    return "\n\n".join(f"[{c.index + 1}/{len(completions)}] {c.text}" for c in completions)


def stream_answers(streams: Sequence[AnswerStream], interval: float = 0.05) -> bool:
    """Refresh ``streams`` every ``interval`` seconds until their requests end.

    Returns True when interrupted (Ctrl-C): every request is then aborted in the engine and what
    was generated so far stays in the handles.
    """
    poll = min(interval, 0.02)
    last = 0.0
    try:
        while True:
            done = all(s.handle.done for s in streams)
            now = time.monotonic()
            # An answer's first text shows at once; later refreshes come every ``interval``.
            waiting = [s for s in streams if not s.shown and not s.handle.done]
            first_text = any(s.handle.delta_count for s in waiting)
            if done:
                # No last streaming refresh: each answer's final rendering replaces it right away,
                # and with a large batch that refresh would double the work after the last token.
                return False
            if first_text or now - last >= interval:
                last = now
                for stream in streams:
                    stream.refresh()
            if waiting and not first_text:
                waiting[0].handle.wait_for_delta(0, poll)  # wakes when the first text arrives
            else:
                time.sleep(poll)
    except KeyboardInterrupt:
        for stream in streams:
            stream.handle.abort()
        # The driver drops the requests at its next step; wait briefly so the snapshot is final.
        deadline = time.monotonic() + 5
        while not all(s.handle.done for s in streams) and time.monotonic() < deadline:
            time.sleep(0.01)
        return True
