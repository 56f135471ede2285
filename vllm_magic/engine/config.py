"""Turn what the user typed into vLLM engine arguments, in one place.

* ``parse_engine_flags`` reads ``vllm serve``-style flags with vLLM's own argument parser, so every
  engine flag vLLM knows works with the same spelling, and keeps only the ones the user gave.
* ``resolve_engine_config`` fills in the demo model when no model is named, checks what can be
  checked without starting anything, and adds the platform's defaults (:mod:`.platform`).
* ``EngineConfig`` is the result: a stable fingerprint for idempotent loads, and the one rule for
  "already loaded" (:meth:`EngineConfig.serves`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError
from .compat import import_vllm
from .platform import parallel_sizes, platform_defaults, platform_name

__all__ = ["EngineConfig", "ConfigError", "parse_engine_flags", "resolve_engine_config", "short_model_name",
           "FETCH_ONLY_ARGS"]


@dataclass(frozen=True)
class EngineConfig:
    """A fully resolved engine configuration: the model plus keyword arguments for ``vllm.LLM``."""

    model: str
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    platform: str = "cpu"
    #: The engine arguments the user gave (``engine_kwargs`` adds the platform defaults to them).
    requested: dict[str, Any] = field(default_factory=dict, compare=False)
    #: CPU: where the engine's compute threads run (``VLLM_CPU_OMP_THREADS_BIND``); None elsewhere.
    cpu_threads: str | None = field(default=None, compare=False)

    @property
    def parallel_summary(self) -> str:
        """How the model is split, for the load line ("tensor parallel 2, threads on cores 0 | 1"),
        or "" for one rank with threads the OS places."""
        sizes = parallel_sizes(self.engine_kwargs)
        if self.cpu_threads and self.cpu_threads != "nobind":
            sizes.append(f"threads on cores {self.cpu_threads.replace('|', ' | ')}")
        return ", ".join(sizes)

    @property
    def short_name(self) -> str:
        """The model as people call it: a local directory by its folder name, a hub id as is."""
        return short_model_name(self.model)

    def serves(self, wanted: "EngineConfig", derived: Callable[[], dict[str, Any]] | None = None) -> bool:
        """Whether an engine running this configuration serves a request for ``wanted``.

        The one rule for "already loaded" (``%vllm_load`` and the LangChain classes alike): the
        same model on the same platform, and every engine argument the user gave for ``wanted``
        has the same value here: set explicitly, left at vLLM's default, or, for values vLLM
        derives while starting (``max_model_len``), what ``derived()`` says the engine runs with.
        Arguments that only say how to fetch the weights never force a reload.
        """
        if self.model != wanted.model or self.platform != wanted.platform:
            return False
        if self.fingerprint == wanted.fingerprint:
            return True
        defaults = _engine_arg_defaults()
        known: dict[str, Any] | None = None
        for key in wanted.requested:
            if key in FETCH_ONLY_ARGS:
                continue
            value = wanted.engine_kwargs.get(key, wanted.requested[key])
            if self.engine_kwargs.get(key, defaults.get(key, _MISSING)) == value:
                continue
            if key not in self.engine_kwargs and derived is not None:
                known = derived() if known is None else known
                if known.get(key, _MISSING) == value:
                    continue
            return False
        return True

    @property
    def fingerprint(self) -> str:
        """Stable hash of everything that shapes the engine; equal configs share one engine."""
        blob = json.dumps({"model": self.model, "kwargs": self.engine_kwargs, "platform": self.platform},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM``."""
        return {"model": self.model, **self.engine_kwargs}


#: Engine arguments that say how to fetch or trust the weights, not what the running engine is.
FETCH_ONLY_ARGS = frozenset({"trust_remote_code", "download_dir"})
_MISSING = object()


def short_model_name(model: str | None) -> str:
    """A model's name for people: a local directory by its folder name, a hub id as is."""
    if not model:
        return ""
    if os.path.isdir(model):
        return os.path.basename(model.rstrip("/")) or model
    return model


@lru_cache(maxsize=1)
def _engine_arg_defaults() -> dict[str, Any]:
    from dataclasses import MISSING, fields

    from .compat import EngineArgs

    return {f.name: f.default for f in fields(EngineArgs) if f.default is not MISSING}


@lru_cache(maxsize=1)
def _engine_parser() -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    import_vllm()
    from vllm.engine.arg_utils import EngineArgs

    from .compat import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="%vllm_load", add_help=False, exit_on_error=False)
    EngineArgs.add_cli_args(parser)
    defaults = vars(parser.parse_args([]))
    return parser, defaults


class _ParseFailure(Exception):
    pass


def parse_engine_flags(argv: str | Sequence[str]) -> dict[str, Any]:
    """Parse ``vllm serve`` engine flags into the keyword arguments the user actually set.

    Raises :class:`ConfigError` with argparse's one-line reason on an unknown flag or bad value.
    """
    args = shlex.split(argv) if isinstance(argv, str) else list(argv)
    if not args:
        return {}
    parser, defaults = _engine_parser()

    def fail(message: str) -> None:
        raise _ParseFailure(message)

    # argparse calls error() (which exits) for some problems even with exit_on_error=False.
    parser.error = fail  # type: ignore[method-assign]
    try:
        namespace, extra = parser.parse_known_args(args)
    except _ParseFailure as exc:
        raise ConfigError(str(exc)) from None
    except argparse.ArgumentError as exc:
        raise ConfigError(str(exc)) from None
    except SystemExit:  # pragma: no cover - older parsers still exit
        raise ConfigError(f"invalid engine flags: {' '.join(args)}") from None
    if extra:
        raise ConfigError(f"unrecognized engine arguments: {' '.join(extra)}")
    given = {}
    for key, value in vars(namespace).items():
        if key in defaults and value != defaults[key]:
            given[key] = value
    return given


def _demo_model() -> str:
    from ..demo.model import prepare_demo_model

    return str(prepare_demo_model())


def _looks_like_local_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(model))


def resolve_engine_config(model: str | os.PathLike | None = None, **engine_kwargs: Any) -> EngineConfig:
    """Resolve a model and engine keyword arguments into an :class:`EngineConfig`.

    ``model=None`` means the embedded demo model. Keyword arguments use ``vllm.LLM``'s names
    (``max_model_len=2048``, ``tensor_parallel_size=2``); the user's values always win over the
    platform defaults. Raises :class:`ConfigError` for a local path that does not exist or an
    unknown argument, before any engine is touched.
    """
    engine_kwargs = {k: v for k, v in engine_kwargs.items() if v is not None}
    engine_kwargs.pop("model", None)
    if isinstance(model, os.PathLike):  # what prepare_demo_model() and friends return
        model = os.fspath(model)
    if model is None or model == "":
        model = _demo_model()
    elif _looks_like_local_path(model):
        path = Path(model).expanduser()
        if not path.exists():
            raise ConfigError(f"no such model directory: {model}")
        model = str(path.resolve())
    _check_known(engine_kwargs)
    platform = platform_name()
    kwargs, threads = platform_defaults(platform, model, engine_kwargs)
    return EngineConfig(model=model, engine_kwargs=kwargs, platform=platform, requested=dict(engine_kwargs),
                        cpu_threads=threads)


def _check_known(engine_kwargs: dict[str, Any]) -> None:
    from dataclasses import fields

    from .compat import EngineArgs

    known = {f.name for f in fields(EngineArgs)}
    # LLM() also takes a few of its own (e.g. "seed" is an EngineArgs field; these are not).
    known |= {"hf_overrides", "compilation_config", "mm_processor_kwargs", "kv_cache_memory_bytes"}
    unknown = sorted(set(engine_kwargs) - known)
    if unknown:
        raise ConfigError(f"unknown engine argument(s): {', '.join(unknown)}")
