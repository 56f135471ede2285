"""Sampling defaults shared by every front-end, and the one function that builds ``SamplingParams``.

``SamplingDefaults`` is a traitlets ``HasTraits`` model: the widgets link to it, ``%config`` writes
to it (through the magics' traits), and the magics and LangChain objects read it for whatever the
call does not set. ``build_sampling_params`` merges defaults and per-call overrides; nothing else in
the package constructs ``SamplingParams``.
"""

from __future__ import annotations

import json as _json
from typing import Any, Mapping

from traitlets import Bool, Float, HasTraits, Int, List, TraitError, Unicode, Union, validate
from traitlets import Any as AnyTrait

__all__ = ["SamplingDefaults", "build_sampling_params", "SAMPLING_FIELDS", "sampling_overrides"]

#: Per-call sampling options that map one-to-one onto ``SamplingParams`` fields.
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "max_tokens", "stop", "seed", "n",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "logprobs",
)

DEFAULT_MAX_TOKENS = 256


class SamplingDefaults(HasTraits):
    """The kernel's sampling defaults; one instance per session, observed by the widgets."""

    temperature = Float(0.7, min=0.0, max=2.0, help="Sampling temperature; 0 is greedy.")
    top_p = Float(1.0, min=0.0, max=1.0, help="Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.")
    top_k = Int(0, min=0, help="Keep only the top_k most likely tokens; 0 disables.")
    min_p = Float(0.0, min=0.0, max=1.0, help="Drop tokens less likely than min_p times the most likely one.")
    max_tokens = Int(DEFAULT_MAX_TOKENS, min=1, help="Most tokens to generate per answer.")
    repetition_penalty = Float(1.0, min=0.01, max=5.0, help="Penalty > 1 discourages repeating tokens.")
    presence_penalty = Float(0.0, min=-2.0, max=2.0, help="Penalty for tokens already present.")
    frequency_penalty = Float(0.0, min=-2.0, max=2.0, help="Penalty proportional to how often a token appeared.")
    seed = Union([Int(), AnyTrait(None)], default_value=None, allow_none=True,
                 help="Random seed for reproducible sampling; None is random.")
    stop = List(Unicode(), default_value=[], help="Strings that end generation (not included in the answer).")
    system_prompt = Unicode("", help="System message prepended in chat mode; empty for none.")
    raw = Bool(False, help="Send prompts as plain completion text instead of through the chat template.")

    @validate("seed")
    def _valid_seed(self, proposal):
        value = proposal["value"]
        if value is None or value == "":
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise TraitError(f"seed must be an integer or None, not {value!r}") from None

    def reset(self) -> None:
        """Put every field back to its default value."""
        for name, trait in self.traits().items():
            if name in _DEFAULTS_FIELDS:
                setattr(self, name, trait.default())

    def as_dict(self) -> dict[str, Any]:
        """The current values, for display and for LangChain's identifying params."""
        return {name: getattr(self, name) for name in _DEFAULTS_FIELDS}


_DEFAULTS_FIELDS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "seed", "stop", "system_prompt", "raw")


def sampling_overrides(**kwargs: Any) -> dict[str, Any]:
    """Keep only the sampling fields a caller actually set (``None`` means "use the default")."""
    return {k: v for k, v in kwargs.items() if k in SAMPLING_FIELDS and v is not None}


def build_sampling_params(defaults: SamplingDefaults | None = None, overrides: Mapping[str, Any] | None = None, *,
                          json_schema: Any = None, regex: str | None = None, choice: list[str] | None = None,
                          **extra: Any):
    """Build ``SamplingParams`` from the session defaults and per-call overrides.

    ``overrides`` win over ``defaults``; ``None`` values in overrides are ignored. ``json_schema``,
    ``regex`` and ``choice`` constrain the output through vLLM's structured outputs.
    """
    from .compat import RequestOutputKind, SamplingParams, structured_outputs_kwargs

    values: dict[str, Any] = {}
    if defaults is not None:
        values.update(temperature=defaults.temperature, top_p=defaults.top_p, top_k=defaults.top_k,
                      min_p=defaults.min_p, max_tokens=defaults.max_tokens,
                      repetition_penalty=defaults.repetition_penalty,
                      presence_penalty=defaults.presence_penalty, frequency_penalty=defaults.frequency_penalty,
                      seed=defaults.seed, stop=list(defaults.stop))
    else:
        values["max_tokens"] = DEFAULT_MAX_TOKENS
    for key, value in dict(overrides or {}, **extra).items():
        if value is not None:
            values[key] = value
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    if not values.get("stop"):
        values.pop("stop", None)
    if values.get("top_k") in (None, -1):
        values["top_k"] = 0
    if isinstance(json_schema, str):
        json_schema = _json.loads(json_schema)
    values.update(structured_outputs_kwargs(json=json_schema, regex=regex, choice=choice))
    values["output_kind"] = RequestOutputKind.DELTA
    return SamplingParams(**values)
