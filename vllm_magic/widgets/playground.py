"""A self-contained playground widget: prompt box, Generate, streamed answer, controls, history.

``%vllm_playground`` displays a :class:`Playground`. Generate submits the prompt with the session's
current sampling defaults and streams the answer on a background thread, so the notebook stays
responsive (the Stop button, the sliders and other cells keep working while it runs). The last runs
are kept with the settings they used.
"""

from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as widgets

from .panel import SamplingPanel, changed_settings

__all__ = ["Playground", "PlaygroundRun"]

_REFRESH = 0.1  # seconds between updates of the streamed answer (each update is one comm message)
_PRE = ("<pre class='vllm-answer' style='white-space: pre-wrap; word-break: normal; overflow-wrap: anywhere; "
        "margin: 0; font-family: inherit'>{}</pre>")


@dataclass
class PlaygroundRun:
    """One Generate: the prompt, the sampling settings it used, and what came back."""

    prompt: str
    settings: dict[str, Any]
    text: str = ""
    result: Any = None  # the GenerationResult once finished
    error: str | None = None
    finished: bool = False
    started: float = field(default_factory=time.time)

    @property
    def summary(self) -> str:
        """``37 tokens · TTFT 120 ms · 25.1 tok/s`` (or the error)."""
        if self.error:
            return self.error
        return self.result.summary if self.result is not None else "running"

    def changed_settings(self) -> dict[str, Any]:
        """The settings that differ from the initial sampling defaults."""
        return changed_settings(self.settings)


class Playground(widgets.VBox):
    """Prompt box, Generate and Stop buttons, streamed answer, sampling controls and a run history.

    ``generate(prompt)`` does what the Generate button does and returns the :class:`PlaygroundRun`;
    ``wait()`` blocks until it finishes. ``runs`` holds the last ``history_size`` runs, newest last.
    """

    def __init__(self, session: Any = None, *, history_size: int = 10, **kwargs: Any) -> None:
        if session is None:
            from ..engine import get_session

            session = get_session()
        self.session = session
        self.history_size = max(1, int(history_size))
        self.runs: list[PlaygroundRun] = []
        self._thread: threading.Thread | None = None
        self._handle: Any = None

        self.prompt = widgets.Textarea(value="", placeholder="Prompt (chat mode: one user message)", rows=4,
                                       layout=widgets.Layout(width="100%"))
        self.prompt.add_class("vllm-prompt")
        self.generate_button = widgets.Button(description="Generate", icon="play", button_style="primary",
                                              tooltip="submit the prompt with the settings below")
        self.generate_button.add_class("vllm-generate")
        self.generate_button.on_click(lambda _b: self.generate())
        self.stop_button = widgets.Button(description="Stop", icon="stop", disabled=True,
                                          tooltip="abort this playground's request")
        self.stop_button.add_class("vllm-playground-stop")
        self.stop_button.on_click(lambda _b: self.stop())
        self.stats = widgets.HTML("")
        self.stats.add_class("vllm-playground-stats")
        self.answer = widgets.HTML(_PRE.format(""), layout=widgets.Layout(
            min_height="3em", max_height="24em", overflow="auto", border="1px solid var(--jp-border-color2, #ddd)",
            padding="4px 8px"))
        self.answer.add_class("vllm-playground-answer")
        self.history = widgets.HTML("")
        self.history.add_class("vllm-playground-history")
        self.controls = SamplingPanel(session, show_status=False)
        settings = widgets.Accordion([self.controls], titles=("Sampling settings",))
        history = widgets.Accordion([self.history], titles=("History",))
        history.selected_index = 0
        super().__init__([self.prompt, widgets.HBox([self.generate_button, self.stop_button, self.stats]),
                          self.answer, settings, history], **kwargs)
        self.add_class("vllm-playground")

    # ----- public API ----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def last(self) -> PlaygroundRun | None:
        """The most recent run."""
        return self.runs[-1] if self.runs else None

    def generate(self, prompt: str | None = None) -> PlaygroundRun | None:
        """Submit ``prompt`` (default: the prompt box) and stream the answer on a background thread.

        Returns the new run, or None when nothing was submitted (empty prompt, a run in progress,
        or the session refused it; the reason is shown in the answer area).
        """
        if prompt is not None:
            self.prompt.value = prompt
        text = self.prompt.value
        if self.running:
            return None
        if not text.strip():
            self._show_message("Type a prompt first.")
            return None
        run = PlaygroundRun(prompt=text, settings=self.session.defaults.as_dict())
        try:
            handle = self.session.submit(text)[0]
        except Exception as exc:  # no model, prompt too long, dead engine: say so in the widget
            run.error = f"{type(exc).__name__}: {exc}"
            run.finished = True
            self._remember(run)
            self._show_message(run.error)
            return None
        self._handle = handle
        self.answer.value = _PRE.format("")
        self.stats.value = "<i>generating…</i>"
        self.generate_button.disabled = True
        self.stop_button.disabled = False
        self._remember(run)
        self._thread = threading.Thread(target=self._stream, args=(handle, run), name="vllm-magic-playground",
                                        daemon=True)
        self._thread.start()
        return run

    def wait(self, timeout: float | None = None) -> PlaygroundRun | None:
        """Wait for the current run to finish; returns the last run."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"the playground's request did not finish in {timeout} s")
        return self.last

    def stop(self) -> None:
        """Abort this playground's request (what was generated stays)."""
        handle = self._handle
        if handle is not None:
            handle.abort()

    def close(self) -> None:
        """Abort a run in progress and close the widgets."""
        self.stop()
        self.controls.close()
        for child in (self.prompt, self.generate_button, self.stop_button, self.stats, self.answer, self.history):
            child.close()
        super().close()

    def __repr__(self) -> str:
        name = self.session.config.short_name if self.session.loaded else "no model"
        return f"Playground({name}, {len(self.runs)} run{'s' * (len(self.runs) != 1)})"

    # ----- the background thread -----------------------------------------------------------------
    def _stream(self, handle: Any, run: PlaygroundRun) -> None:
        # Runs on its own thread: it only sets widget traits (comm messages are thread-safe) and
        # never enters an Output context.
        shown = 0.0
        try:
            for delta in handle:
                run.text += delta
                now = time.monotonic()
                if now - shown >= _REFRESH:
                    self.answer.value = _PRE.format(html.escape(run.text))
                    shown = now
            run.result = handle.result()
            run.text = run.result.text
        except Exception as exc:
            run.error = f"{type(exc).__name__}: {exc}"
        finally:
            run.finished = True
            self._handle = None
            self.answer.value = _PRE.format(html.escape(run.text)) + (
                f"<div style='color: var(--jp-error-color1, #c00)'>{html.escape(run.error)}</div>" if run.error else "")
            self.stats.value = html.escape(run.summary)
            self.history.value = self._history_html()
            self.generate_button.disabled = False
            self.stop_button.disabled = True

    # ----- display helpers -----------------------------------------------------------------------
    def _remember(self, run: PlaygroundRun) -> None:
        self.runs.append(run)
        del self.runs[:-self.history_size]
        self.history.value = self._history_html()

    def _show_message(self, message: str) -> None:
        self.answer.value = f"<div style='color: var(--jp-error-color1, #c00)'>{html.escape(message)}</div>"

    def _history_html(self) -> str:
        if not self.runs:
            return "<i>no runs yet</i>"
        rows = []
        for run in reversed(self.runs):
            settings = ", ".join(f"{k}={v!r}" for k, v in run.changed_settings().items()) or "defaults"
            rows.append(
                "<tr>"
                f"<td>{time.strftime('%H:%M:%S', time.localtime(run.started))}</td>"
                f"<td>{html.escape(_excerpt(run.prompt, 60))}</td>"
                f"<td><code>{html.escape(settings)}</code></td>"
                f"<td>{html.escape(run.summary)}</td>"
                f"<td>{html.escape(_excerpt(run.text, 120))}</td>"
                "</tr>")
        head = "<tr><th>time</th><th>prompt</th><th>settings</th><th>result</th><th>answer</th></tr>"
        return (f"<table class='vllm-history' style='font-size: 90%; text-align: left'>{head}{''.join(rows)}</table>")


def _excerpt(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
