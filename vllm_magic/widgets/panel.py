"""Sampling controls as ipywidgets, bound two-way to the session's sampling defaults.

:class:`SamplingPanel` is what ``%vllm_controls`` (and ``%vllm_load``) display: sliders and fields
for the sampling defaults, a Reset button, a Stop button that aborts every request in flight, and a
status line with the model and the last request's speed. Every control is linked with
``traitlets.link`` to the one :class:`~vllm_magic.engine.requests.sampling.SamplingDefaults` of the session, so the
panel, ``%config``, code and any number of other panels always show and use the same values.

Each control has explicit bounds that vLLM accepts, so nothing a user can set in the panel makes a
request fail. The interactive playground (:mod:`.playground`) is built from this panel.
"""

from __future__ import annotations

import html
from typing import Any, Callable

import ipywidgets as widgets
import traitlets

from ..engine.requests.sampling import SamplingDefaults

__all__ = ["SamplingPanel", "SLIDERS", "encode_stop", "decode_stop", "parse_seed", "changed_settings"]

#: Slider controls: trait name -> (widget class, min, max, step, label, tooltip). The bounds are the
#: ranges vLLM accepts (top_p > 0, repetition_penalty > 0), narrowed to what is useful to drag;
#: ``max_tokens``'s upper bound is the loaded model's context length.
SLIDERS: dict[str, tuple[type, float, float, float, str, str]] = {
    "temperature": (widgets.FloatSlider, 0.0, 2.0, 0.05, "temperature", "0 is greedy (always the most likely token)"),
    "top_p": (widgets.FloatSlider, 0.01, 1.0, 0.01, "top_p", "sample from the smallest set of tokens whose probability reaches top_p"),
    "top_k": (widgets.IntSlider, 0, 200, 1, "top_k", "sample from the k most likely tokens; 0 = all"),
    "min_p": (widgets.FloatSlider, 0.0, 1.0, 0.01, "min_p", "drop tokens less likely than min_p x the most likely one"),
    "max_tokens": (widgets.IntSlider, 1, 4096, 1, "max_tokens", "most tokens per answer (bounded by the model's context)"),
    "repetition_penalty": (widgets.FloatSlider, 0.5, 2.0, 0.01, "repetition", "repetition penalty; > 1 discourages repeating tokens"),
}

#: Largest seed accepted (torch generators take any 64-bit value; stay within the signed range).
MAX_SEED = 2**63 - 1
#: Context length assumed for the max_tokens slider while no model is loaded.
_UNLOADED_CONTEXT = 4096
_STYLE = {"description_width": "7.5em"}
_ESCAPES = (("\\", "\\\\"), ("\n", "\\n"), ("\t", "\\t"))


def encode_stop(stop: list[str]) -> list[str]:
    """Stop strings as shown in the tags field: newlines and tabs written as ``\\n`` and ``\\t``."""
    out = []
    for item in stop:
        for raw, shown in _ESCAPES:
            item = item.replace(raw, shown)
        out.append(item)
    return out


def decode_stop(tags: list[str]) -> list[str]:
    """The tags field back to stop strings (``\\n`` is a newline); empty tags are dropped (vLLM refuses them)."""
    out = []
    for tag in tags:
        text, i = [], 0
        while i < len(tag):
            if tag[i] == "\\" and i + 1 < len(tag) and tag[i + 1] in "nt\\":
                text.append({"n": "\n", "t": "\t", "\\": "\\"}[tag[i + 1]])
                i += 2
            else:
                text.append(tag[i])
                i += 1
        if text:
            out.append("".join(text))
    return out


def parse_seed(text: str) -> int | None:
    """The seed field's text as a seed: blank is ``None`` (random); raises ValueError otherwise."""
    text = text.strip()
    if not text:
        return None
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"seed must be between 0 and {MAX_SEED}")
    return value


def changed_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` (a ``SamplingDefaults.as_dict()``) that differ from the initial defaults."""
    initial = SamplingDefaults().as_dict()
    return {k: v for k, v in values.items() if initial.get(k) != v}


def _max_model_len(session: Any) -> int | None:
    try:
        status = session.status()
    except Exception:  # a dead engine: the panel still opens
        return None
    return status.max_model_len if status.loaded else None


class SamplingPanel(widgets.VBox):
    """The session's sampling defaults as widgets, with Reset, Stop and a status line.

    ``SamplingPanel(session)`` links every control to ``session.defaults``; changing a control
    changes the next request's ``SamplingParams``, and changing the defaults (code, ``%config``,
    another panel, Reset) moves the controls. ``show_status=False`` leaves out the Stop button and
    the status line (the playground has its own). ``close()`` unlinks it from the session.
    """

    def __init__(self, session: Any = None, *, show_status: bool = True, **kwargs: Any) -> None:
        if session is None:
            from ..engine import get_session

            session = get_session()
        self.session = session
        defaults = session.defaults
        self.controls: dict[str, widgets.Widget] = {}
        self._links: list[Any] = []
        self._observers: list[tuple[traitlets.HasTraits, Callable, str]] = []
        self._model = session.config.short_name if session.loaded else None
        self._context = _max_model_len(session)

        for name, (cls, low, high, step, label, tip) in SLIDERS.items():
            if name == "max_tokens":  # bound before linking, so a large default is not clamped twice
                high = max(2, int(self._context or _UNLOADED_CONTEXT))
            control = cls(min=low, max=high, step=step, description=label, tooltip=tip,
                          continuous_update=False, readout=True, style=_STYLE,
                          layout=widgets.Layout(width="auto", min_width="18em"))
            if cls is widgets.FloatSlider:
                control.readout_format = ".2f"
            control.add_class(f"vllm-{name.replace('_', '-')}")
            self.controls[name] = control
            self._links.append(traitlets.link((defaults, name), (control, "value")))

        seed = widgets.Text(value="", placeholder="random", description="seed", continuous_update=False,
                            tooltip="an integer makes sampling reproducible; blank = random", style=_STYLE,
                            layout=widgets.Layout(width="auto", min_width="18em"))
        seed.add_class("vllm-seed")
        self.controls["seed"] = seed
        self._watch(defaults, self._seed_from_defaults, "seed")
        self._watch(seed, self._seed_from_text, "value")
        self._seed_from_defaults({"new": defaults.seed})

        stop = widgets.TagsInput(value=[], allow_duplicates=False, placeholder="stop strings (Enter adds; \\n = newline)",
                                 tooltip="generation ends at any of these strings",
                                 layout=widgets.Layout(width="auto"))
        stop.add_class("vllm-stop")
        self.controls["stop"] = stop
        self._links.append(traitlets.link((defaults, "stop"), (stop, "value"), transform=(encode_stop, decode_stop)))

        mode = widgets.ToggleButtons(options=[("chat", False), ("raw", True)], description="mode", style=_STYLE,
                                     tooltips=["prompts go through the model's chat template",
                                               "prompts are sent as plain completion text"])
        mode.style.button_width = "5em"
        mode.add_class("vllm-mode")
        self.controls["raw"] = mode
        self._links.append(traitlets.link((defaults, "raw"), (mode, "value")))

        system = widgets.Textarea(value="", placeholder="system prompt (chat mode)", continuous_update=False,
                                  rows=2, layout=widgets.Layout(width="auto"))
        system.add_class("vllm-system-prompt")
        self.controls["system_prompt"] = system
        self._links.append(traitlets.link((defaults, "system_prompt"), (system, "value")))
        self._links.append(traitlets.dlink((defaults, "raw"), (system, "disabled")))  # raw text has no system turn

        self.reset_button = widgets.Button(description="Reset to defaults", icon="undo",
                                           tooltip="put every sampling setting back to its default")
        self.reset_button.add_class("vllm-reset")
        self.reset_button.on_click(lambda _b: self.reset())
        buttons = [self.reset_button]

        self.stop_button: widgets.Button | None = None
        self.status_line: widgets.HTML | None = None
        self._listener: Callable | None = None
        if show_status:
            self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="danger",
                                              tooltip="abort every request in flight")
            self.stop_button.add_class("vllm-stop-all")
            self.stop_button.on_click(lambda _b: self.stop())
            buttons.append(self.stop_button)
            self.status_line = widgets.HTML(self._status_html())
            self.status_line.add_class("vllm-status")
            self._listener = self._on_result
            session.add_listener(self._listener)

        c = self.controls
        grid = widgets.GridBox(
            [c["temperature"], c["max_tokens"], c["top_p"], c["top_k"], c["min_p"], c["repetition_penalty"],
             c["seed"], c["raw"]],
            layout=widgets.Layout(grid_template_columns="repeat(auto-fill, minmax(22em, 1fr))", grid_gap="2px 16px"))
        rows: list[widgets.Widget] = [grid, stop, system, widgets.HBox(buttons)]
        if self.status_line is not None:
            rows.append(self.status_line)
        super().__init__(rows, **kwargs)
        self.add_class("vllm-sampling-panel")

    # ----- public API ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Put every sampling default back to its initial value (all panels follow)."""
        self.session.defaults.reset()

    def stop(self) -> int:
        """Abort every request in flight; returns how many were stopped."""
        stopped = self.session.abort_all()
        self.session.listeners.drain()  # the stopped requests' results first, then this line
        if self.status_line is not None:
            self.status_line.value = self._status_html(f"stopped {stopped} request{'s' * (stopped != 1)}")
        return stopped

    def set_context_length(self, max_model_len: int | None) -> None:
        """Bound the max_tokens slider by a model's context length (None: no model loaded)."""
        self._context = max_model_len
        # A smaller bound clamps the slider and, through the link, the default: the session would
        # bound each request the same way.
        self.controls["max_tokens"].max = max(2, int(max_model_len or _UNLOADED_CONTEXT))

    def close(self) -> None:
        """Unlink from the session and close the controls."""
        if self._listener is not None:
            self.session.remove_listener(self._listener)
            self._listener = None
        for link in self._links:
            link.unlink()
        self._links = []
        for owner, fn, name in self._observers:
            owner.unobserve(fn, name)
        self._observers = []
        for child in list(self.controls.values()) + [self.reset_button, self.stop_button, self.status_line]:
            if child is not None:
                child.close()
        super().close()

    def __repr__(self) -> str:
        name = self.session.config.short_name if self.session.loaded else "no model"
        changed = ", ".join(f"{k}={v!r}" for k, v in changed_settings(self.session.defaults.as_dict()).items())
        return f"SamplingPanel({name}; {changed or 'default settings'})"

    # ----- internals -----------------------------------------------------------------------------
    def _watch(self, owner: traitlets.HasTraits, fn: Callable, name: str) -> None:
        owner.observe(fn, name)
        self._observers.append((owner, fn, name))

    def _seed_from_defaults(self, change: Any) -> None:
        value = change["new"]
        text = "" if value is None else str(value)
        if self.controls["seed"].value.strip() != text:
            self.controls["seed"].value = text

    def _seed_from_text(self, change: Any) -> None:
        seed = self.controls["seed"]
        try:
            value = parse_seed(change["new"])
        except ValueError:
            # Not a seed: show the value in use again rather than sending something vLLM refuses.
            current = self.session.defaults.seed
            seed.value = "" if current is None else str(current)
            return
        if value != self.session.defaults.seed:
            self.session.defaults.seed = value

    def _on_result(self, result: Any) -> None:
        # Called on the session's listeners thread: only set traits (comm messages are thread-safe).
        if self.status_line is None:
            return
        model = self.session.config.short_name if self.session.loaded else None
        if model != self._model:  # another model was loaded since the panel opened
            self._model = model
            self.set_context_length(_max_model_len(self.session))
        self.status_line.value = self._status_html(result.summary)

    def _status_html(self, last: str | None = None) -> str:
        session = self.session
        if not session.loaded:
            head = "no model loaded: run <code>%vllm_load</code>"
        else:
            context = self._context
            head = f"<b>{html.escape(session.config.short_name)}</b>" + (f" · context {context}" if context else "")
        if last is None and session.last_result is not None:
            last = "last request: " + session.last_result.summary
        elif last is not None and not last.startswith("stopped"):
            last = "last request: " + last
        tail = f" · {html.escape(last)}" if last else ""
        return f"<span style='font-size: 90%; color: var(--jp-ui-font-color2, #666)'>{head}{tail}</span>"
