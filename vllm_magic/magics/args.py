"""The magics' arguments: the shared sampling flags, and reading a magic's line.

Every magic parses its line with its own ``@magic_arguments`` parser, shell quoting included
(:func:`parse_line`). ``%vllm_load`` and ``%vllm_serve`` also take ``vllm serve`` flags: their own
flags are known from that parser, and :mod:`vllm_magic.engine.flags` splits the rest off
(:func:`split_vllm_line`). A mistake is a one-line ``UsageError``.
"""

from __future__ import annotations

import shlex
from typing import Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument

from ..engine.flags import FlagError, MagicLine, split_line
from ..engine.requests.sampling import SAMPLING_FIELDS, option_help, option_type

__all__ = ["sampling_args", "sampling_overrides", "parse_line", "split_vllm_line", "magic_name"]

# Short spellings of the most used sampling flags.
_SHORT_FLAGS = {"temperature": "-t", "max_tokens": "-m", "n": "-n"}
# Per-call options without a flag: benchmarks and code set them, a cell has no use for them.
_NO_FLAG = ("ignore_eos", "thinking_token_budget")


def _flag_for(name: str) -> Callable:
    """The ``argument`` decorator of one sampling option, derived from its one declaration."""
    flags = [_SHORT_FLAGS[name]] if name in _SHORT_FLAGS else []
    if name != "n":
        flags.append("--" + name.replace("_", "-"))
    if name == "stop":
        return argument(*flags, action="append", metavar="TEXT",
                        help="A string that ends the answer (not included); repeat for several.")
    if name in ("logprobs", "prompt_logprobs"):
        return argument(*flags, type=option_type(name), metavar="K", help=option_help(name))
    return argument(*flags, type=option_type(name), help=option_help(name))


def sampling_args(f: Callable) -> Callable:
    """The per-call sampling flags shared by every magic that generates (one per sampling option)."""
    for name in reversed([n for n in SAMPLING_FIELDS if n not in _NO_FLAG]):
        f = _flag_for(name)(f)
    return f


def sampling_overrides(args: Any) -> dict[str, Any]:
    """The sampling options given on a magic's line (those left out keep the session's defaults)."""
    return {name: getattr(args, name) for name in SAMPLING_FIELDS if getattr(args, name, None) is not None}


def magic_name(magic: Callable) -> str:
    """How the user types ``magic``: ``%%vllm`` for the cell magic, ``%name`` for the others."""
    return ("%%" if magic.__name__ == "vllm" else "%") + magic.__name__


def parse_line(magic: Callable, line: str | list[str]) -> Any:
    """Parse a magic's line with its ``magic_arguments`` parser, shell-style quoting included.

    (IPython's ``parse_argstring`` keeps the quotes around values, which breaks inline JSON.)
    """
    try:
        argv = shlex.split(line) if isinstance(line, str) else list(line)
    except ValueError as exc:
        raise UsageError(f"{exc} in the magic's line") from None
    try:
        return magic.parser.parse_args(argv)
    except UsageError as exc:
        name = magic_name(magic)
        flags = ", ".join("/".join(a.option_strings) for a in magic.parser._actions
                          if a.option_strings and a.dest != "help")
        listing = f"; {name} takes {flags}" if "unrecognized" in str(exc) else ""
        raise UsageError(f"{exc}{listing} ({name}? explains the flags)") from None


def split_vllm_line(magic: Callable, line: str) -> tuple[Any, MagicLine]:
    """Parse the magic's own flags on ``line`` and split off the model and the ``vllm serve`` flags
    (read later by :mod:`vllm_magic.engine.flags`)."""
    name = magic_name(magic)
    try:
        tokens = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"{name}: {exc}") from None
    try:
        split = split_line(tokens, _own_flags(magic))
    except FlagError as exc:
        raise UsageError(f"{name}: {exc}") from None
    if split.help:
        raise UsageError(f"{name}? shows the help; `vllm serve --help` lists the engine flags")
    return parse_line(magic, split.own), split


def _own_flags(magic: Callable) -> dict[str, bool]:
    """The magic's own option strings (from its ``@argument`` declarations) -> whether one takes a value."""
    return {option: action.nargs != 0 for action in magic.parser._actions for option in action.option_strings}
