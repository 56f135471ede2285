"""From a ``%%vllm`` cell body to prompts: ``{name}`` interpolation, ``---`` batches, JSON schemas.

Pure functions, no engine: the magics call them before anything is submitted, so every mistake
found here is a :class:`PromptError` with a one-line message naming the problem.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any, Callable, Mapping

__all__ = ["PromptError", "interpolate", "split_batch", "resolve_json_schema", "parse_choices"]

# A line holding only "---" (surrounding blanks allowed) separates the prompts of one batch.
_SEPARATOR = re.compile(r"^[ \t]*---[ \t]*$", re.MULTILINE)


class PromptError(ValueError):
    """The cell cannot be turned into prompts (missing name, bad braces, bad schema...)."""


class _Formatter(string.Formatter):
    """``str.format`` restricted to names of a namespace, with errors that name the culprit."""

    def get_value(self, key: Any, args: Any, kwargs: Mapping[str, Any]) -> Any:
        if isinstance(key, int) or key == "":
            raise PromptError("empty or numbered braces in the prompt; write {{ and }} for literal braces")
        if key not in kwargs:
            raise PromptError(f"name {key!r} is not defined (write {{{{ and }}}} for literal braces)")
        return kwargs[key]


def interpolate(text: str, namespace: Mapping[str, Any]) -> str:
    """Fill ``{name}`` (also ``{name.attr}``, ``{name[0]}``, ``{name:.2f}``) from ``namespace``.

    ``{{`` and ``}}`` stand for literal braces. Raises :class:`PromptError` for a missing name or
    unbalanced braces.
    """
    if "{" not in text and "}" not in text:
        return text
    try:
        return _Formatter().vformat(text, (), namespace)
    except PromptError:
        raise
    except (ValueError, IndexError) as exc:
        raise PromptError(f"cannot fill the prompt's braces ({exc}); write {{{{ and }}}} for literal braces") from None
    except (AttributeError, KeyError, TypeError) as exc:
        raise PromptError(f"cannot fill the prompt's braces: {type(exc).__name__}: {exc}") from None


def split_batch(text: str) -> list[str]:
    """Split a cell body on lines that hold only ``---``; blank prompts are an error."""
    parts = [part.strip() for part in _SEPARATOR.split(text)]
    if len(parts) > 1 and any(not part for part in parts):
        raise PromptError("a prompt of the batch is empty (two '---' lines in a row, or one at the start or end)")
    if not parts[0]:
        raise PromptError("the cell is empty: write the prompt below the %%vllm line")
    return parts


def parse_choices(spec: str) -> list[str]:
    """``"yes,no,maybe"`` -> ``["yes", "no", "maybe"]`` (blanks around commas ignored)."""
    choices = [c.strip() for c in spec.split(",") if c.strip()]
    if not choices:
        raise PromptError("--choice needs at least one choice, e.g. --choice yes,no")
    return choices


def resolve_json_schema(spec: str, namespace: Mapping[str, Any]) -> tuple[dict, Callable[[str], Any]]:
    """Turn ``--json SPEC`` into a JSON schema and a parser for the answer.

    ``SPEC`` is the name of a dict or of a pydantic model class in ``namespace``, or inline JSON.
    The parser returns a pydantic instance for a model (a plain dict when the answer does not
    validate), the decoded JSON otherwise.
    """
    value: Any = namespace.get(spec, None) if spec.isidentifier() else None
    if value is None:
        if spec.isidentifier():
            raise PromptError(f"--json {spec}: no such name in the namespace (give a dict, a pydantic model or inline JSON)")
        try:
            value = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise PromptError(f"--json: invalid JSON schema ({exc.msg} at character {exc.pos})") from None
    model = None
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        model = value
        value = model.model_json_schema()
    elif isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise PromptError(f"--json {spec}: invalid JSON schema ({exc.msg})") from None
    if not isinstance(value, dict):
        raise PromptError(f"--json {spec}: a JSON schema must be an object, not {type(value).__name__}")
    _check_schema(value, spec)

    def parse(text: str) -> Any:
        data = json.loads(text)
        if model is not None:
            try:
                return model.model_validate(data)
            except Exception:
                return data
        return data

    return value, parse


def _check_schema(schema: dict, spec: str) -> None:
    try:
        import jsonschema
    except ImportError:  # optional: vLLM rejects what it cannot compile anyway
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "top level"
        raise PromptError(f"--json {_short(spec)}: invalid JSON schema at {where}: {exc.message}") from None


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
