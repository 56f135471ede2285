"""The ``vllm serve`` flags of a magic's line, split and read in one place.

A ``%vllm_load`` or ``%vllm_serve`` line mixes the magic's own flags, a model and ``vllm serve``
flags spelled as vLLM spells them. :func:`split_line` separates the three (the caller says which
flags are its own). The ``vllm serve`` flags are then read by vLLM's own argument parsers, so every
flag vLLM knows works, with vLLM's messages for a bad one; only the flags given are kept:

* :func:`load_flags` (``%vllm_load``): engine arguments, read by ``EngineArgs``' parser;
* :func:`remote_flags` (``%vllm_load --remote``): no engine here, so no engine flags (and no
  vLLM import: a remote session needs no vLLM in its process);
* :func:`serve_flags` (``%vllm_serve``): engine and server arguments, read by ``vllm serve``'s parser.

The model may be given as ``--model`` too, and ``--reasoning-parser``/``--tool-call-parser`` name
the session's parsers (:class:`~.requests.reasoning.Parsers`) for ``%vllm_load``: they are applied
to the generated text on this side, not engine arguments. Every refusal is a :class:`FlagError`.
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass, field, fields as dataclass_fields
from functools import lru_cache
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence

from ..errors import ConfigError
from .config import Parsers

__all__ = ["FlagError", "MagicLine", "VllmFlags", "split_line", "load_flags", "remote_flags", "serve_flags",
           "parse_duration", "format_duration", "parser_flags", "hub_flags"]

#: Flags read on this side before vLLM's parser sees the rest: the model (vLLM's parser would drop
#: one equal to its default model) and the session's parser names (flag -> Parsers field).
_PARSER_FLAGS = {"--reasoning-parser": "reasoning", "--tool-call-parser": "tool_call"}
#: ``vllm serve`` wants it beside ``--tool-call-parser``; here tool calls are read whenever asked for.
_ACCEPTED_FLAGS = ("--enable-auto-tool-choice",)
_LOAD_HINT = "(%vllm_load takes every `vllm serve` engine flag; see `vllm serve --help`)"
_SERVE_HINT = "(%vllm_serve takes every `vllm serve` flag)"


class FlagError(ConfigError):
    """A magic's line holds a flag that cannot be read: unknown, missing its value, or with a bad value."""


@dataclass(frozen=True)
class MagicLine:
    """A magic's line, split: the magic's own flags, the model and the ``vllm serve`` flags."""

    #: The magic's own flags with their values, for its own parser.
    own: list[str]
    #: The model named first on the line (``None``: none; ``--model`` may still be among ``vllm``).
    model: str | None
    #: The ``vllm serve`` flags, as typed.
    vllm: list[str]
    #: ``-h``/``--help`` was given where a flag goes.
    help: bool = False


@dataclass(frozen=True)
class VllmFlags:
    """The ``vllm serve`` flags of a line, read: only those given."""

    model: str | None = None
    #: Engine arguments (``vllm.LLM``'s and ``EngineArgs``' names).
    engine: dict[str, Any] = field(default_factory=dict)
    #: ``vllm serve``'s own arguments that are not engine ones (``%vllm_serve``).
    server: dict[str, Any] = field(default_factory=dict)
    #: The session's parsers (``%vllm_load``; ``%vllm_serve`` hands the parser flags to the server).
    parsers: Parsers = field(default_factory=Parsers)
    #: LoRA adapters to register once the engine runs, ``(name, path)`` (``%vllm_load --lora-modules``).
    adapters: tuple[tuple[str, str], ...] = ()


def split_line(tokens: Sequence[str], own: Mapping[str, bool]) -> MagicLine:
    """Split a magic's line (shell words) into its own flags, the model and the ``vllm serve`` flags.

    ``own`` maps each of the magic's option strings to whether it takes a value; the model is a
    first word that is not a flag. Raises :class:`FlagError` for an own flag without its value.
    """
    ours: list[str] = []
    vllm: list[str] = []
    model = None
    asks_help = False
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name = token.split("=", 1)[0]
        if name in own:
            ours.append(token)
            if own[name] and "=" not in token:
                if i + 1 >= len(tokens):
                    raise FlagError(f"{name} needs a value")
                ours.append(tokens[i + 1])
                i += 1
        elif token in ("-h", "--help"):
            asks_help = True
        elif i == 0 and not token.startswith("-"):
            model = token
        else:
            vllm.append(token)
        i += 1
    return MagicLine(ours, model, vllm, asks_help)


def load_flags(argv: str | Sequence[str], model: str | None = None) -> VllmFlags:
    """Read ``%vllm_load``'s ``vllm serve`` flags: the model, the session's parsers (checked
    against vLLM's) and the engine arguments given, ``--concurrency`` (vllm-magic's) among them.
    ``model`` is the one named first on the line."""
    model, parsers, rest = _take_ours(_words(argv), model)
    adapters, rest = _take_lora_modules(rest)
    own, rest = _take_engine_options(rest)
    engine = _read(_engine_parser, rest, "unrecognized engine arguments: {}", _LOAD_HINT)
    return VllmFlags(model, {**engine, **own}, {}, parsers, adapters)


def parser_flags(argv: str | Sequence[str]) -> Parsers:
    """The session's parsers named on a ``%vllm_load`` line (vLLM is imported only to check names)."""
    return _take_ours(_words(argv), None)[1]


def remote_flags(argv: str | Sequence[str], model: str | None = None) -> VllmFlags:
    """Read ``%vllm_load --remote``'s flags: the model (which one the server serves) and the session's
    parsers; engine flags are refused, since the server runs with those it was started with."""
    model, parsers, rest = _take_ours(_words(argv), model)
    if rest:
        raise FlagError(f"engine flags ({' '.join(rest)}) shape an engine started here; a --remote server "
                        "runs with the flags it was started with")
    return VllmFlags(model, {}, {}, parsers)


def serve_flags(argv: str | Sequence[str], model: str | None = None) -> VllmFlags:
    """Read ``%vllm_serve``'s flags into engine and server arguments, with ``vllm serve``'s parser
    (parser flags included: the server applies them itself)."""
    words = _words(argv)
    model, rest = _take_model(words, model)
    own, rest = _take_engine_options(rest)
    given = _read(_serve_parser, rest, "unrecognized flags: {} (`vllm serve --help` lists them)", _SERVE_HINT)
    engine = _engine_fields() if given else frozenset()  # vLLM is imported only when flags were given
    return VllmFlags(model, {**{k: v for k, v in given.items() if k in engine}, **own},
                     {k: v for k, v in given.items() if k not in engine})


# ----- the one reading of vLLM's flags --------------------------------------------------------------

#: The flags that say which files of a Hub model to fetch (engine argument names), read without vLLM.
_HUB_FLAGS = {"--revision": "revision", "--download-dir": "download_dir", "--download_dir": "download_dir"}


def hub_flags(argv: str | Sequence[str], model: str | None = None) -> tuple[str | None, dict[str, str]]:
    """The model and the flags that say where its Hub files come from (``revision``,
    ``download_dir``), read without vLLM's parser: a model is downloaded before vLLM is imported."""
    model, rest = _take_model(_words(argv), model)
    return model, {_HUB_FLAGS[flag]: value for flag, value in _pairs(rest, _HUB_FLAGS, "a value") if flag}


def _words(argv: str | Sequence[str]) -> list[str]:
    if not isinstance(argv, str):
        return list(argv)
    try:
        return shlex.split(argv)
    except ValueError as exc:
        raise FlagError(str(exc)) from None


def _take_ours(argv: list[str], model: str | None) -> tuple[str | None, Parsers, list[str]]:
    """The model, the session's parsers and the other flags; the parsers are not engine arguments,
    so choosing or changing one never restarts an engine."""
    model, rest = _take_model(argv, model)
    names: dict[str, str] = {}
    kept: list[str] = []
    for flag, value in _pairs(rest, _PARSER_FLAGS, "a parser name"):
        if flag is not None:
            names[_PARSER_FLAGS[flag]] = value
        elif value not in _ACCEPTED_FLAGS:
            kept.append(value)
    try:
        parsers = Parsers(**names).check()
    except ConfigError as exc:  # a name vLLM's parsers lack, or no vLLM here to run them
        raise FlagError(str(exc)) from None
    return model, parsers, kept


#: vllm-magic's own engine options, spelled as flags (``--concurrency 32``): read here, not by vLLM.
_ENGINE_OPTION_FLAGS = {"--concurrency": "concurrency"}


def _take_engine_options(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """vllm-magic's own engine options (whole numbers) and the other flags."""
    own: dict[str, Any] = {}
    rest: list[str] = []
    for flag, value in _pairs(argv, _ENGINE_OPTION_FLAGS, "a whole number"):
        if flag is None:
            rest.append(value)
            continue
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number < 1:
            raise FlagError(f"{flag} takes a whole number of at least 1 (full-length sequences the KV cache "
                            f"holds), not {value!r}")
        own[_ENGINE_OPTION_FLAGS[flag]] = number
    return own, rest


def _take_lora_modules(argv: list[str]) -> tuple[tuple[tuple[str, str], ...], list[str]]:
    """``--lora-modules`` as ``vllm serve`` spells it (``NAME=PATH ...``, or JSON objects with
    ``name`` and ``path``), and the other flags. ``vllm serve`` registers these adapters when it
    starts; ``%vllm_load`` registers them once its engine runs."""
    adapters: list[tuple[str, str]] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        name, equals, value = argv[i].partition("=")
        if name != "--lora-modules":
            rest.append(argv[i])
            i += 1
            continue
        values = [value] if equals else []
        i += 1
        while not equals and i < len(argv) and not argv[i].startswith("-"):
            values.append(argv[i])
            i += 1
        if not values:
            raise FlagError("--lora-modules needs NAME=PATH (one or more)")
        adapters.extend(_lora_module(v) for v in values)
    return tuple(adapters), rest


def _lora_module(value: str) -> tuple[str, str]:
    if value.lstrip().startswith("{"):
        try:
            entry = json.loads(value)
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("path"):
            raise FlagError(f"--lora-modules {value}: a JSON entry needs \"name\" and \"path\"")
        return str(entry["name"]), str(entry["path"])
    name, equals, path = value.partition("=")
    if not equals or not name or not path:
        raise FlagError(f"--lora-modules takes NAME=PATH, not {value!r}")
    return name, path


def _take_model(argv: list[str], model: str | None) -> tuple[str | None, list[str]]:
    """The model (named first on the line, or by ``--model``) and the other flags."""
    rest: list[str] = []
    for flag, value in _pairs(argv, ("--model",), "a model name"):
        if flag is None:
            rest.append(value)
        elif model is not None and value != model:
            raise FlagError(f"the model is given twice ({model} and --model {value}): give it once")
        else:
            model = value
    return model, rest


def _pairs(argv: list[str], flags: Collection[str], what: str) -> Iterator[tuple[str | None, str]]:
    """``(flag, value)`` for each of ``flags`` in ``argv`` (``--flag value`` or ``--flag=value``),
    ``(None, word)`` for every other word."""
    i = 0
    while i < len(argv):
        name, equals, value = argv[i].partition("=")
        if name in flags:
            if not equals:
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    raise FlagError(f"{name} needs {what}")
                value = argv[i + 1]
                i += 1
            yield name, value
        else:
            yield None, argv[i]
        i += 1


def _read(build: Callable[[], tuple[argparse.ArgumentParser, dict[str, Any]]], argv: list[str],
          unknown: str, hint: str) -> dict[str, Any]:
    """The arguments that vLLM's parser (from ``build``) reads in ``argv``, those given only."""
    if not argv:  # nothing to read: vLLM is not imported (it may not be installed here)
        return {}
    parser, defaults = build()

    def refuse(message: str) -> None:
        raise FlagError(f"{message} {hint}")

    # argparse calls error() (which exits) for some problems even with exit_on_error=False.
    parser.error = refuse  # type: ignore[method-assign]
    try:
        namespace, extra = parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise FlagError(f"{exc} {hint}") from None
    if extra:
        raise FlagError(f"{unknown.format(' '.join(extra))} {hint}")
    return {k: v for k, v in vars(namespace).items() if k in defaults and v != defaults[k]}


@lru_cache(maxsize=1)
def _engine_parser() -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    from .compat import EngineArgs, FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="%vllm_load", add_help=False, exit_on_error=False)
    EngineArgs.add_cli_args(parser)
    return parser, vars(parser.parse_args([]))


@lru_cache(maxsize=1)
def _serve_parts() -> tuple[argparse.ArgumentParser, dict[str, Any], dict[str, argparse.Action]]:
    # ``vllm serve``'s parser, built once (it takes a second): its defaults, and its actions by
    # destination, which render arguments back into flags.
    from .compat import serve_arg_parser

    parser = serve_arg_parser("%vllm_serve")
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    return parser, vars(parser.parse_args([])), actions


def _serve_parser() -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    parser, defaults, _ = _serve_parts()
    return parser, defaults


def serve_has_flag(dest: str) -> bool:
    """Whether the installed vLLM's ``vllm serve`` has the option stored as ``dest`` (``"uds"``)."""
    return dest in _serve_parts()[2]


def serve_cli_flags(kwargs: dict[str, Any]) -> list[str]:
    """``vllm serve`` flags for keyword arguments (engine or server ones): the inverse of parsing."""
    _, _, actions = _serve_parts()
    argv: list[str] = []
    for key, value in kwargs.items():
        action = actions.get(key)
        if action is None:
            raise ConfigError(f"`vllm serve` has no flag for {key}")
        long = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")][0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(long if value else "--no-" + long[2:])
        elif action.nargs == 0:  # store_true
            if value:
                argv.append(long)
        elif isinstance(value, (list, tuple)) and action.nargs in ("+", "*"):
            argv += [long, *map(str, value)]
        elif isinstance(value, dict):
            argv += [long, json.dumps(value)]
        else:
            argv += [long, str(value)]
    return argv


@lru_cache(maxsize=1)
def _engine_fields() -> frozenset[str]:
    from .compat import EngineArgs

    return frozenset(f.name for f in dataclass_fields(EngineArgs))


def parse_duration(text: str) -> float | None:
    """``90s``, ``15m``, ``2h`` or a number of minutes -> seconds; ``never`` -> None."""
    text = str(text).strip().lower()
    if text in ("never", "none", "off"):
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    scale = units.get(text[-1:], None)
    number = text[:-1] if scale else text
    try:
        value = float(number) * (scale or 60)
    except ValueError:
        raise FlagError(f"--idle-timeout takes a duration such as 90s, 15m or 2h (or never), not {text!r}") from None
    if value <= 0:
        raise FlagError("--idle-timeout must be positive (or never)")
    return value


def format_duration(seconds: float) -> str:
    """``42 s``, ``15 min``, ``2.5 h``: a duration as the status lines say it."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
