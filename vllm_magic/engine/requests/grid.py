"""Grids: every prompt under every combination of sampling settings, compared side by side.

:func:`grid_settings` turns axes (``{"temperature": [0, 0.7], "top_p": [0.9, 1.0]}``) into the
settings of their product, checking each option and value first; :func:`check_grid_size` refuses a
grid larger than one submission runs at once. A :class:`Grid` holds the handles of one submission
and gives the answers as results, rows, a pandas DataFrame or an HTML table (prompt x setting).
"""

from __future__ import annotations

import html
import itertools
from typing import Any, Mapping, Sequence

from ...errors import RequestError
from .prompts import TokenPrompt
from .sampling import PER_CALL_FIELDS, SAMPLING_FIELDS, SamplingTraits, option_type

__all__ = ["Grid", "grid_settings", "check_grid_size", "parse_grid_flag", "GRID_LIMIT", "GRID_FIELDS"]

#: The most requests one grid submits where the engine does not say how many it runs at once.
GRID_LIMIT = 256
#: Options a grid can vary: every single-valued sampling option (``stop`` is a list), and ``lora``:
#: registered LoRA adapters by name (``base``: the model without one).
GRID_FIELDS = (*(name for name in SAMPLING_FIELDS if name != "stop"), "lora")
# Lower bounds of the options that have no trait (the per-call ones).
_PER_CALL_MIN = {"n": 1, "logprobs": 0, "prompt_logprobs": 0, "thinking_token_budget": 0}


def parse_grid_flag(spec: str) -> tuple[str, list[Any]]:
    """``"temperature=0,0.7,1.2"`` (one ``--grid`` flag) -> ``("temperature", [0.0, 0.7, 1.2])``."""
    name, sep, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name or not values.strip():
        raise RequestError(f"--grid {spec}: write an option and its values, e.g. --grid temperature=0,0.7,1.2")
    _check_field(name)
    kind = str if name == "lora" else option_type(name)
    parsed = []
    for text in (v.strip() for v in values.split(",")):
        if not text:
            raise RequestError(f"--grid {spec}: an empty value (two commas in a row?)")
        parsed.append(_parse_value(name, kind, text))
    return name, parsed


def _parse_value(name: str, kind: type, text: str) -> Any:
    if kind is str:
        return text
    if name == "seed" and text.lower() == "none":
        return None
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return kind(text)
    except ValueError:
        raise RequestError(f"--grid {name}: {text!r} is not {'a number' if kind in (int, float) else kind.__name__}"
                           + (" (a whole number)" if kind is int else "")) from None


def _check_field(name: str) -> None:
    if name not in GRID_FIELDS:
        raise RequestError(f"{name} is not a sampling option a grid can vary; these can: {', '.join(GRID_FIELDS)}")


def _check_value(name: str, value: Any) -> Any:
    """``value`` for option ``name``, checked against the option's range (one line when it is out)."""
    if name == "lora":  # the engine knows its adapters: an unknown name is refused when the grid is prepared
        if value is not None and (not isinstance(value, str) or not value):
            raise RequestError(f"the grid's lora values name registered adapters (or 'base'), not {value!r}")
        return value
    if name in PER_CALL_FIELDS:
        kind = PER_CALL_FIELDS[name][0]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise RequestError(f"the grid's {name} values are whole numbers, not {value!r}")
        low = _PER_CALL_MIN.get(name)
        if low is not None and value < low:
            raise RequestError(f"the grid's {name} values are {low} or more, not {value!r}")
        return value
    trait = SamplingTraits.class_traits()[name]
    if isinstance(value, int) and not isinstance(value, bool) and option_type(name) is float:
        value = float(value)
    low, high = getattr(trait, "min", None), getattr(trait, "max", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (
            (low is not None and value < low) or (high is not None and value > high)):
        bounds = f"between {low} and {high}" if low is not None and high is not None else (
            f"{low} or more" if low is not None else f"{high} or less")
        raise RequestError(f"the grid's {name} values are {bounds}, not {value!r}")
    try:
        SamplingTraits(**{name: value})
    except Exception:  # noqa: BLE001 - traitlets' own wording is a paragraph
        raise RequestError(f"{value!r} is not a value of {name}") from None
    return value


def grid_settings(axes: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The settings of a grid: the product of ``axes`` (option -> values), in order, each checked.

    Raises :class:`RequestError` in one line for an option a grid cannot vary, an empty axis, a value
    out of its option's range, or an option that is both an axis and fixed for the whole grid."""
    if not axes:
        raise RequestError("a grid needs at least one option to vary, e.g. temperature=[0, 0.7, 1.2]")
    names = list(axes)
    for name in names:
        _check_field(name)
        if fixed and fixed.get(name) is not None:
            raise RequestError(f"{name} is both varied by the grid and fixed for all of it; give it once")
        values = axes[name]
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not len(values):
            raise RequestError(f"the grid's {name} needs a list of values to try, not {values!r}")
    checked = [[_check_value(name, value) for value in axes[name]] for name in names]
    return [dict(zip(names, combination)) for combination in itertools.product(*checked)]


def check_grid_size(prompts: int, settings: int, limit: int) -> None:
    """Refuse a grid of more requests than the engine runs at once (their timings would not compare)."""
    count = prompts * settings
    if count > limit:
        raise RequestError(
            f"the grid is {prompts} prompt{'s' if prompts != 1 else ''} x {settings} settings = {count} requests, "
            f"more than this engine runs at once ({limit}, vLLM's --max-num-seqs): vary fewer values, or split "
            "the prompts over several grids")


class Grid:
    """The answers of one grid: ``handles[s][p]`` is prompt ``p`` under setting ``s``.

    In a notebook it shows as a table (a row per prompt, a column per setting: the text, its
    tokens, the time to first token and the mean logprob); ``results()`` waits for every answer,
    ``to_pandas()`` gives one row per answer.
    """

    def __init__(self, prompts: list[Any], settings: list[dict[str, Any]], handles: list[list[Any]]) -> None:
        self.prompts = prompts
        self.settings = settings
        self.handles = handles

    def __len__(self) -> int:
        return len(self.prompts) * len(self.settings)

    @property
    def done(self) -> bool:
        return all(h.done for row in self.handles for h in row)

    def wait(self) -> "Grid":
        """Wait for every answer (Ctrl-C stops every request of the grid)."""
        try:
            for row in self.handles:
                for handle in row:
                    handle.result()
        except KeyboardInterrupt:
            self.abort()
            raise
        return self

    def abort(self) -> None:
        """Stop every request of the grid that is still running."""
        for row in self.handles:
            for handle in row:
                handle.abort()

    def results(self) -> list[list[Any]]:
        """``results()[s][p]``: the :class:`GenerationResult` of prompt ``p`` under setting ``s``."""
        self.wait()
        return [[handle.snapshot() for handle in row] for row in self.handles]

    def result(self, prompt: int, setting: int) -> Any:
        """The result of prompt number ``prompt`` under setting number ``setting``."""
        return self.handles[setting][prompt].result()

    def rows(self) -> list[dict[str, Any]]:
        """One dict per answer: the prompt, the setting's options, the text and its metrics."""
        rows = []
        for setting, row in zip(self.settings, self.results()):
            for index, (prompt, result) in enumerate(zip(self.prompts, row)):
                rows.append({"prompt_index": index, "prompt": prompt_label(prompt), **setting, "text": result.text,
                             "tokens": result.output_tokens, "ttft": result.ttft,
                             "mean_logprob": result.mean_logprob,
                             "perplexity": result.perplexity, "finish_reason": result.finish_reason})
        return rows

    def to_pandas(self) -> Any:
        """The answers as a pandas DataFrame, one row per answer (``pip install pandas``)."""
        try:
            import pandas
        except ImportError:
            raise RequestError("grid.to_pandas() needs pandas: pip install pandas (grid.rows() gives the same "
                               "rows as dicts)") from None
        return pandas.DataFrame(self.rows())

    def _repr_html_(self) -> str:
        return grid_html(self.prompts, self.settings, self.results())

    def __repr__(self) -> str:
        state = "done" if self.done else "running"
        return f"<Grid {len(self.prompts)} prompt(s) x {len(self.settings)} setting(s), {state}>"


def prompt_label(prompt: Any) -> str:
    """A prompt as a table shows it: its text, a conversation's last message, or its token count."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, TokenPrompt):
        return f"{len(prompt.token_ids)} prompt tokens"
    messages = list(prompt)
    return str(messages[-1].get("content", "")) if messages else ""


def setting_label(setting: Mapping[str, Any]) -> str:
    return " · ".join(f"{name}={value}" for name, value in setting.items())


def grid_html(prompts: list[Any], settings: list[dict[str, Any]], results: list[list[Any]]) -> str:
    """The grid as an HTML table: a row per prompt, a column per setting."""
    esc = html.escape
    head = "".join(f'<th style="text-align:left">{esc(setting_label(s))}</th>' for s in settings)
    body = []
    for p, prompt in enumerate(prompts):
        cells = []
        for s in range(len(settings)):
            result = results[s][p]
            stats = [f"{result.output_tokens} tok"]
            if result.ttft is not None:
                stats.append(f"TTFT {result.ttft * 1000:.0f} ms")
            mean = result.mean_logprob
            if mean is not None:
                stats.append(f"mean logprob {mean:.2f}")
            cells.append(f'<td style="text-align:left;vertical-align:top;white-space:pre-wrap">{esc(result.text)}'
                         f'<div style="opacity:0.6;font-size:0.85em">{" · ".join(stats)}</div></td>')
        label = prompt_label(prompt)
        label = label if len(label) <= 200 else label[:199] + "…"
        body.append(f'<tr><th style="text-align:left;vertical-align:top;white-space:pre-wrap">{esc(label)}</th>'
                    + "".join(cells) + "</tr>")
    return ('<table class="vllm-magic-grid"><thead><tr><th style="text-align:left">prompt</th>' + head
            + "</tr></thead><tbody>" + "".join(body) + "</tbody></table>")
