"""Turn engine arguments (a magic line's are read by :mod:`.flags`) into an engine configuration.

* ``resolve_engine_config`` fills in the demo model when no model is named, checks what can be
  checked without starting anything, and adds the platform's defaults (:mod:`.platform`).
* :class:`Parsers` are the session's choice of vLLM's reasoning and tool call parsers.
* ``EngineConfig`` is the result: a stable fingerprint for idempotent loads, and the one rule for
  "already loaded" (:meth:`EngineConfig.serves`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from ..hub import is_hub_model, local_snapshot
from .compat import import_vllm
from .platform import parallel_sizes, platform_defaults, platform_name

__all__ = ["EngineConfig", "Parsers", "ConfigError", "resolve_engine_config", "short_model_name",
           "FETCH_ONLY_ARGS", "OWN_ENGINE_ARGS"]


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
    #: A Hub model's snapshot in the local cache, which the engine loads (vLLM never downloads
    #: itself); None for a local directory, or a Hub model not downloaded yet (:mod:`..hub`).
    weights: str | None = field(default=None, compare=False)

    @property
    def files(self) -> str:
        """Where the model's files are: its snapshot for a Hub model, else ``model``."""
        return self.weights or self.model

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
            default = _MISSING if key in _PLANNED_ARGS and self.platform == "cuda" else defaults.get(key, _MISSING)
            if self.engine_kwargs.get(key, default) == value:
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

    @property
    def needs_download(self) -> bool:
        """A Hub model whose files are not in the local cache yet."""
        return self.weights is None and is_hub_model(self.model)

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM`` (vllm-magic's own engine options left out). A Hub model
        runs from its cached snapshot, under its Hub name."""
        kwargs = {"model": self.files, **{k: v for k, v in self.engine_kwargs.items() if k not in OWN_ENGINE_ARGS}}
        if self.weights:
            for key in ("revision", "download_dir"):  # they said where the snapshot comes from: it is here
                kwargs.pop(key, None)
            kwargs.setdefault("served_model_name", self.model)
            if kwargs.get("tokenizer") in (None, self.model):
                kwargs["tokenizer"] = self.weights
                kwargs.pop("tokenizer_revision", None)
        return kwargs


#: Engine arguments that say how to fetch or trust the weights, not what the running engine is.
FETCH_ONLY_ARGS = frozenset({"trust_remote_code", "download_dir"})
#: Engine options of vllm-magic's own, not vLLM's: ``concurrency``, the full-length sequences a GPU
#: engine's KV cache is sized for (:mod:`.gpu_memory`).
OWN_ENGINE_ARGS = frozenset({"concurrency"})
#: On a GPU these are sized by :mod:`.gpu_memory` when not given, not left at vLLM's defaults.
_PLANNED_ARGS = frozenset({"gpu_memory_utilization", "kv_cache_memory_bytes"})
_MISSING = object()


@dataclass(frozen=True)
class Parsers:
    """The session's vLLM parsers by name (None: none). ``reasoning`` splits thinking from the
    answer; ``tool_call`` reads tool calls out of answers when the model may choose (``"auto"``).
    ``%vllm_load MODEL --reasoning-parser NAME --tool-call-parser NAME`` (the ``vllm serve``
    spelling, read by :mod:`.flags`) chooses them; they never restart an engine."""

    reasoning: str | None = None
    tool_call: str | None = None

    def check(self) -> "Parsers":
        """Raise :class:`ConfigError` naming vLLM's parsers when a name is not one of them."""
        if self.reasoning is None and self.tool_call is None:
            return self  # nothing to look up: a session without vLLM here (``--remote``) needs none
        from .compat import reasoning_parser_class, tool_parser_class

        try:
            import_vllm()
        except (ImportError, ConfigError):  # import_vllm says "vLLM is not installed" as a ConfigError
            raise ConfigError("vLLM's reasoning and tool call parsers run in this process, and vLLM is not "
                              "installed here: pip install vllm, or leave out the parser flags") from None
        for kind, name, lookup in (("reasoning", self.reasoning, reasoning_parser_class),
                                   ("tool call", self.tool_call, tool_parser_class)):
            if name is None:
                continue
            try:
                lookup(name)
            except KeyError as exc:
                raise ConfigError(f"vLLM has no {kind} parser {name!r}; it has: {exc.args[0]}") from None
        return self



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

    from .gpu_memory import DEFAULT_CONCURRENCY

    defaults = {f.name: f.default for f in fields(EngineArgs) if f.default is not MISSING}
    return {**defaults, "concurrency": DEFAULT_CONCURRENCY}


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
    # A Hub model: its cached snapshot, found offline.
    snapshot = local_snapshot(model, engine_kwargs.get("revision"), engine_kwargs.get("download_dir"))
    weights = None if snapshot is None else str(snapshot)
    platform = platform_name()
    kwargs, threads = platform_defaults(platform, weights or model, engine_kwargs)
    return EngineConfig(model=model, engine_kwargs=kwargs, platform=platform, requested=dict(engine_kwargs),
                        cpu_threads=threads, weights=weights)


def _check_known(engine_kwargs: dict[str, Any]) -> None:
    from dataclasses import fields

    from .compat import EngineArgs

    known = {f.name for f in fields(EngineArgs)}
    # LLM() also takes a few of its own (e.g. "seed" is an EngineArgs field; these are not).
    known |= {"hf_overrides", "compilation_config", "mm_processor_kwargs", "kv_cache_memory_bytes"}
    unknown = sorted(set(engine_kwargs) - known - OWN_ENGINE_ARGS)
    if unknown:
        raise ConfigError(f"unknown engine argument(s): {', '.join(unknown)}")
    concurrency = engine_kwargs.get("concurrency")
    if concurrency is not None and (not isinstance(concurrency, int) or isinstance(concurrency, bool)
                                    or concurrency < 1):
        raise ConfigError(f"concurrency is how many full-length sequences the KV cache holds: a whole number "
                          f"of at least 1, not {concurrency!r}")
