"""Sampling: the one definition of every option, the shared defaults, and the one builder.

:class:`SamplingTraits` declares each default-able option once (type, range, help). The session's
:class:`SamplingDefaults` is built from it, and so are the magics' ``%config`` traits, the ``%%vllm``
flags and the LangChain fields: every field list in the package derives from here.
:func:`sampling_values` merges the defaults with a call's overrides, the one merge for every
backend; :func:`build_sampling_params` turns them into vLLM's ``SamplingParams`` (nothing else
constructs one).
"""

from __future__ import annotations

import json as _json
from typing import Any, Mapping

from traitlets import Bool, Float, HasTraits, Int, List, TraitError, TraitType, Unicode, Union, validate
from traitlets import Any as AnyTrait

from ...errors import RequestError

__all__ = ["SamplingTraits", "SamplingDefaults", "build_sampling_params", "sampling_values", "json_schema_of", "DEFAULTS_FIELDS", "SAMPLING_FIELDS",
           "PER_CALL_FIELDS", "STRUCTURED_FIELDS", "check_overrides", "option_type", "option_help"]

DEFAULT_MAX_TOKENS = 256


class SamplingTraits(HasTraits):
    """The sampling options that have a session-wide default, each declared once.

    ``sampling=True`` marks the ``SamplingParams`` fields; the others (``system_prompt``, ``raw``)
    shape the prompt. ``config=True`` makes them settable with ``%config`` where mixed in.
    """

    temperature = Float(0.7, min=0.0, max=2.0, help="Sampling temperature; 0 is greedy.").tag(
        config=True, sampling=True)
    top_p = Float(1.0, min=0.0, max=1.0, help="Nucleus sampling: keep the smallest set of tokens whose "
                  "probability reaches top_p.").tag(config=True, sampling=True)
    top_k = Int(0, min=0, help="Keep only the top_k most likely tokens; 0 disables.").tag(config=True, sampling=True)
    min_p = Float(0.0, min=0.0, max=1.0, help="Drop tokens less likely than min_p times the most likely one.").tag(
        config=True, sampling=True)
    max_tokens = Int(DEFAULT_MAX_TOKENS, min=1, help="Most tokens to generate per answer.").tag(
        config=True, sampling=True)
    repetition_penalty = Float(1.0, min=0.01, max=5.0, help="Penalty > 1 discourages repeating tokens.").tag(
        config=True, sampling=True)
    presence_penalty = Float(0.0, min=-2.0, max=2.0, help="Penalty for tokens already present.").tag(
        config=True, sampling=True)
    frequency_penalty = Float(0.0, min=-2.0, max=2.0, help="Penalty proportional to how often a token "
                              "appeared.").tag(config=True, sampling=True)
    seed = Union([Int(), AnyTrait(None)], default_value=None, allow_none=True,
                 help="Random seed for reproducible sampling; None is random.").tag(config=True, sampling=True)
    stop = List(Unicode(), default_value=[], help="Strings that end generation (not included in the "
                "answer).").tag(config=True, sampling=True)
    system_prompt = Unicode("", help="System message prepended in chat mode; empty for none.").tag(config=True)
    raw = Bool(False, help="Send prompts as plain completion text instead of through the chat "
               "template.").tag(config=True)

    @validate("seed")
    def _valid_seed(self, proposal: dict) -> Any:
        value = proposal["value"]
        if value is None or value == "":
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise TraitError(f"seed must be an integer or None, not {value!r}") from None


def _declared(cls: type, **tags: Any) -> tuple[str, ...]:
    """Names of ``cls``'s traits carrying ``tags``, in declaration order (flags and fields read best so)."""
    return tuple(name for name, value in vars(cls).items() if isinstance(value, TraitType)
                 and all(value.metadata.get(k) == v for k, v in tags.items()))


#: Every option with a session default (what ``%config``, the panel and ``as_dict`` show).
DEFAULTS_FIELDS = _declared(SamplingTraits, config=True)
#: Options only a call sets: ``python type``, help. They have no session default.
PER_CALL_FIELDS: dict[str, tuple[type, str]] = {
    "n": (int, "Number of answers to sample for each prompt."),
    "ignore_eos": (bool, "Keep generating after the end-of-sequence token (benchmarks)."),
    "logprobs": (int, "Also return each answer token's log probability and its K most likely alternatives "
                 "(0: the token's own only)."),
    "prompt_logprobs": (int, "Also return each prompt token's log probability and its K most likely "
                        "alternatives (0: the token's own only)."),
    "thinking_token_budget": (int, "Most tokens a reasoning model may think for (vLLM's thinking budget; the "
                              "engine needs vLLM's reasoning config)."),
}
#: Every ``SamplingParams`` option a call may override.
SAMPLING_FIELDS = _declared(SamplingTraits, sampling=True) + tuple(PER_CALL_FIELDS)
#: Options that constrain the answer's form through vLLM's structured outputs.
STRUCTURED_FIELDS = ("json_schema", "regex", "choice")


def option_type(name: str) -> type:
    """The Python type of a sampling option's value (for flags and typed fields)."""
    if name in PER_CALL_FIELDS:
        return PER_CALL_FIELDS[name][0]
    trait = SamplingTraits.class_traits()[name]
    if isinstance(trait, List):
        return list
    return {Float: float, Int: int, Bool: bool, Unicode: str}.get(type(trait), int)  # seed: an int or None


def option_help(name: str) -> str:
    """A sampling option's one-line help."""
    return PER_CALL_FIELDS[name][1] if name in PER_CALL_FIELDS else SamplingTraits.class_traits()[name].help


class SamplingDefaults(SamplingTraits):
    """The kernel's sampling defaults; one instance per session, linked to the widgets and ``%config``."""

    def reset(self) -> None:
        """Put every field back to its default value."""
        traits = self.traits()
        for name in DEFAULTS_FIELDS:
            setattr(self, name, traits[name].default())

    def as_dict(self) -> dict[str, Any]:
        """The current values, for display and for the playground's history."""
        return {name: getattr(self, name) for name in DEFAULTS_FIELDS}


def check_overrides(overrides: Mapping[str, Any], owner: str = "the request") -> None:
    """Refuse option names that are not sampling options, naming the ones that are."""
    unknown = sorted(k for k in overrides if k not in SAMPLING_FIELDS)
    if unknown:
        raise RequestError(f"{owner} does not know the option(s) {', '.join(unknown)}; sampling options: "
                           f"{', '.join(SAMPLING_FIELDS)}; also raw, system, {', '.join(STRUCTURED_FIELDS)}")


def sampling_values(defaults: SamplingDefaults | None = None,
                    overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The sampling options of one request: the session's defaults with the call's overrides.

    ``overrides`` win over ``defaults``; ``None`` values mean "use the default". Unknown names raise
    :class:`~vllm_magic.errors.RequestError`. Plain values, no vLLM: every backend builds its own
    request from them (``SamplingParams`` in process, a JSON body for a server).
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    check_overrides(overrides)
    values: dict[str, Any] = {"max_tokens": DEFAULT_MAX_TOKENS}
    if defaults is not None:
        values.update({name: getattr(defaults, name) for name in _declared(SamplingTraits, sampling=True)})
    values.update(overrides)
    stop = values.get("stop")
    values["stop"] = [stop] if isinstance(stop, str) else list(stop or [])
    if not values["stop"]:
        del values["stop"]
    if values.get("top_k") in (None, -1):  # LangChain's and older vLLM's "disabled"
        values["top_k"] = 0
    return values


def json_schema_of(json_schema: Any) -> Any:
    """A JSON schema given as a dict or as JSON text, as a dict."""
    if isinstance(json_schema, str):
        try:
            return _json.loads(json_schema)
        except ValueError as exc:
            raise RequestError(f"the JSON schema is not valid JSON: {exc}") from None
    return json_schema


def build_sampling_params(defaults: SamplingDefaults | None = None, overrides: Mapping[str, Any] | None = None, *,
                          json_schema: Any = None, regex: str | None = None, choice: list[str] | None = None) -> Any:
    """vLLM ``SamplingParams`` from the session defaults and one call's overrides
    (:func:`sampling_values`).

    ``json_schema``, ``regex`` and ``choice`` constrain the output through vLLM's structured
    outputs. A value vLLM refuses raises :class:`~vllm_magic.errors.RequestError` with its reason.
    """
    from ..compat import RequestOutputKind, SamplingParams, structured_outputs_kwargs

    values = sampling_values(defaults, overrides)
    json_schema = json_schema_of(json_schema)
    try:
        values.update(structured_outputs_kwargs(json=json_schema, regex=regex, choice=choice))
        values["output_kind"] = RequestOutputKind.DELTA
        return SamplingParams(**values)
    except Exception as exc:  # vLLM validates ranges; not all of its errors are ValueErrors
        text = " ".join(str(exc).split())
        raise RequestError(f"invalid sampling value: {text[:300]}") from None
