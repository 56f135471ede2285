"""What the LangChain classes share: engine fields, attaching to the session's engine, sampling
overrides, and turning finished requests into LangChain's metadata.

``VLLM`` and ``ChatVLLM`` never own an engine. Their engine fields describe the engine they want;
constructing one attaches to the session's live engine when it serves the same model with the same
values for every engine argument given, and loads that configuration through the session otherwise
(which replaces the live engine: there is only ever one per process).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import warnings
from dataclasses import MISSING, fields
from functools import lru_cache
from typing import Any, AsyncIterator, Callable, Iterator

from IPython.core.error import UsageError
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from .demo_model import DEMO_MODEL_NAME
from .engine_config import ConfigError, EngineConfig, import_vllm, resolve_engine_config
from .handles import GenerationResult, RequestHandle
from .sampling import SAMPLING_FIELDS
from .session import EngineSession, NoEngineError, PromptTooLongError, get_session

__all__ = ["EngineFields", "engine_request", "engine_serves", "without_needless_fetch_args", "display_model_name", "user_errors",
           "call_overrides", "usage_counts", "CALL_OPTIONS", "wait_all", "await_all", "deltas", "adeltas"]

#: Names under which the demo model can be asked for (besides ``None``).
DEMO_MODEL_ALIASES = frozenset({DEMO_MODEL_NAME, f"HuggingFaceTB/{DEMO_MODEL_NAME}"})

# Engine arguments that say how to fetch or trust the weights, not what the running engine is:
# a live engine of the same model already has its weights, so they never force a reload.
_FETCH_ONLY_ARGS = frozenset({"trust_remote_code", "download_dir"})

# Set while from_session() builds an object: it follows the live engine instead of asking for one.
_FOLLOW_LIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("vllm_magic_follow_live", default=False)

#: Keyword arguments a call may carry besides the sampling fields.
CALL_OPTIONS = frozenset({"json_schema", "regex", "choice", "raw", "system"})


class EngineFields(BaseModel):
    """Engine fields of ``langchain_community.llms.VLLM``, plus attaching to the session's engine."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model: str | None = None
    """Model name or path; None or the demo model's name (``SmolLM2-135M-Instruct``) is the demo model."""
    tensor_parallel_size: int | None = 1
    """Number of GPUs for tensor parallelism."""
    trust_remote_code: bool | None = False
    """Trust remote code of the model repository (tokenizer, configuration)."""
    dtype: str = "auto"
    """Weight and activation dtype; ``"auto"`` keeps the platform default (float32 on CPU)."""
    download_dir: str | None = None
    """Where to download weights; the Hugging Face cache when None."""
    vllm_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further ``vllm.LLM`` engine arguments (``max_model_len``, ``gpu_memory_utilization``, ...).
    Values that differ from the live engine's make a different engine, which replaces the live one."""
    timeout: float | None = None
    """Seconds to wait for an answer; the request is aborted in the engine after that. None: no limit."""
    session: Any = Field(default=None, exclude=True)
    """The engine session to use; the kernel's (``vllm_magic.get_session()``) when None."""

    _wanted: EngineConfig | None = PrivateAttr(default=None)
    _requested: dict[str, Any] = PrivateAttr(default_factory=dict)
    _follow_live: bool = PrivateAttr(default=False)

    @model_validator(mode="before")
    @classmethod
    def _drop_unknown_arguments(cls, values: Any) -> Any:
        """Warn about and drop arguments this class does not know (``api_key``, ``max_retries``, ...)."""
        if not isinstance(values, dict):
            return values
        known = set()
        for name, info in cls.model_fields.items():
            known.add(name)
            if info.alias:
                known.add(info.alias)
            choices = getattr(info.validation_alias, "choices", None) or ()
            known.update(c for c in choices if isinstance(c, str))
        unknown = sorted(set(values) - known)
        if unknown:
            warnings.warn(f"{cls.__name__} ignores unknown argument(s): {', '.join(unknown)}", stacklevel=4)
            values = {k: v for k, v in values.items() if k not in unknown}
        return values

    @model_validator(mode="after")
    def _attach_engine(self) -> "EngineFields":
        self._follow_live = _FOLLOW_LIVE.get()
        if not self._follow_live:
            self._ensure_engine(load=True)
        return self

    # ----- the engine -------------------------------------------------------------------------
    @property
    def engine_session(self) -> EngineSession:
        return self.session if self.session is not None else get_session()

    def _ensure_engine(self, *, load: bool) -> None:
        """Attach to the live engine when it fits, or load this configuration through the session.

        At call time (``load=False``) an engine that does not fit is a mistake to report, not a
        reason to replace what the user loaded since.
        """
        session = self.engine_session
        with user_errors():
            if self._wanted is None:
                model, requested = engine_request(self.model, self.tensor_parallel_size, self.trust_remote_code,
                                                  self.dtype, self.download_dir, self.vllm_kwargs)
                wanted = resolve_engine_config(model, **requested)
                needed = without_needless_fetch_args(wanted.model, requested)
                if needed != requested:  # so that the engine it loads is the one %vllm_load would load
                    requested, wanted = needed, resolve_engine_config(model, **needed)
                self._wanted, self._requested = wanted, requested
            live = session.config
            if live is not None and engine_serves(live, self._wanted, self._requested, lambda: _effective(session)):
                return
            if live is not None and not load:
                raise UsageError(
                    f"{type(self).__name__} was built for {display_model_name(self._wanted.model)} but the live "
                    f"engine is {display_model_name(live.model)} with other arguments; build a new one "
                    f"(or {type(self).__name__}.from_session()) to use the live engine")
            session.load(self._wanted.model, **self._requested)

    def _live_session(self) -> EngineSession:
        """The session, with an engine that serves this object (reloaded after an unload)."""
        if self._follow_live:
            return self.engine_session
        self._ensure_engine(load=self.engine_session.config is None)
        return self.engine_session

    @classmethod
    def from_session(cls, session: EngineSession | None = None, **fields_: Any):
        """An object that uses whatever engine ``session`` (the kernel's when None) has loaded.

        It follows the live engine: after ``%vllm_load`` of another model it uses that one, and it
        never loads anything itself. Other fields (sampling) can be given as keyword arguments.
        """
        session = session or get_session()
        live = session.config
        if live is None:
            raise UsageError("no model is loaded: run %vllm_load (the demo model) or %vllm_load MODEL first")
        token = _FOLLOW_LIVE.set(True)
        try:
            return cls(session=session, model=display_model_name(live.model, for_field=True), **fields_)
        finally:
            _FOLLOW_LIVE.reset(token)

    @property
    def model_name(self) -> str:
        """The model's name as LangChain reports it (the demo model's short name, a Hub id, a path)."""
        session = self.engine_session
        if self._follow_live and session.config is not None:
            return display_model_name(session.config.model)
        if self._wanted is not None:
            return display_model_name(self._wanted.model)
        return self.model or DEMO_MODEL_NAME


def engine_request(model: str | None, tensor_parallel_size: int | None, trust_remote_code: bool | None,
                   dtype: str | None, download_dir: str | None,
                   vllm_kwargs: dict[str, Any] | None) -> tuple[str | None, dict[str, Any]]:
    """The ``session.load`` arguments for these engine fields: only values that differ from vLLM's
    defaults, so that ``VLLM(model=...)`` with langchain_community's defaults matches ``%vllm_load``."""
    requested = dict(vllm_kwargs or {})
    if requested.pop("model", None) is not None:
        raise UsageError("give the model as model=..., not inside vllm_kwargs")
    if tensor_parallel_size not in (None, 1):
        requested["tensor_parallel_size"] = int(tensor_parallel_size)
    if trust_remote_code:
        requested["trust_remote_code"] = True
    if dtype not in (None, "", "auto"):
        requested["dtype"] = dtype
    if download_dir:
        requested["download_dir"] = download_dir
    if model in DEMO_MODEL_ALIASES or model == "":
        model = None
    return model, requested


def without_needless_fetch_args(model_path: str, requested: dict[str, Any]) -> dict[str, Any]:
    """Drop fetch-only arguments that cannot matter for a local model directory: ``download_dir``
    (nothing to download) and ``trust_remote_code`` when the model ships no code (no ``auto_map``,
    as with the demo model). Keeps the seed's ``trust_remote_code=True`` from making an engine
    that differs from ``%vllm_load``'s."""
    if not os.path.isdir(model_path):
        return requested
    needed = {k: v for k, v in requested.items() if k != "download_dir"}
    if needed.get("trust_remote_code") and not _ships_code(model_path):
        del needed["trust_remote_code"]
    return needed


def _ships_code(model_path: str) -> bool:
    import json

    for name in ("config.json", "tokenizer_config.json"):
        try:
            with open(os.path.join(model_path, name)) as f:
                if "auto_map" in json.load(f):
                    return True
        except (OSError, ValueError):
            continue
    return False


@lru_cache(maxsize=1)
def _engine_arg_defaults() -> dict[str, Any]:
    import_vllm()
    from vllm.engine.arg_utils import EngineArgs

    return {f.name: f.default for f in fields(EngineArgs) if f.default is not MISSING}


def engine_serves(live: EngineConfig, wanted: EngineConfig, requested: dict[str, Any],
                  effective: Callable[[], dict[str, Any]] | None = None) -> bool:
    """Whether the live engine serves ``wanted``: the same model, and every engine argument the
    user gave has the same value there — set explicitly, left at vLLM's default, or (for the
    values vLLM derives, like ``max_model_len``) what ``effective()`` says the engine runs with."""
    if live.model != wanted.model or live.platform != wanted.platform:
        return False
    if live.fingerprint == wanted.fingerprint:
        return True
    defaults = _engine_arg_defaults()
    derived: dict[str, Any] | None = None
    for key, value in requested.items():
        if key in _FETCH_ONLY_ARGS:
            continue
        value = wanted.engine_kwargs.get(key, value)
        have = live.engine_kwargs.get(key, defaults.get(key, MISSING))
        if have == value:
            continue
        if key not in live.engine_kwargs and effective is not None:
            derived = effective() if derived is None else derived
            if derived.get(key, MISSING) == value:
                continue
        return False
    return True


def _effective(session: EngineSession) -> dict[str, Any]:
    """Engine arguments vLLM derived when the live engine started (not given by anyone)."""
    status = session.status()
    return {"max_model_len": status.max_model_len, "dtype": status.dtype}


def display_model_name(model: str, *, for_field: bool = False) -> str:
    """A local model directory by its folder name (the demo model as ``SmolLM2-135M-Instruct``)."""
    if os.path.isdir(model):
        return os.path.basename(model.rstrip("/")) if not for_field or _is_demo_dir(model) else model
    return model


def _is_demo_dir(path: str) -> bool:
    from .demo_model import demo_model_dir

    try:
        return os.path.samefile(path, demo_model_dir())
    except OSError:
        return False


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Report user mistakes as ``UsageError`` (one line in IPython, no traceback wall)."""
    try:
        yield
    except (NoEngineError, PromptTooLongError, ConfigError) as exc:
        raise UsageError(str(exc)) from None


def call_overrides(base: dict[str, Any], stop: list[str] | None, kwargs: dict[str, Any],
                   owner: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge per-call keyword arguments over an object's sampling overrides.

    Returns ``(sampling_overrides, call_options)``; ``stop`` given at call time wins over the
    object's. Unknown keywords are a usage error rather than silently ignored.
    """
    kwargs = dict(kwargs)
    if "max_new_tokens" in kwargs:
        kwargs.setdefault("max_tokens", kwargs.pop("max_new_tokens"))
    unknown = sorted(k for k in kwargs if k not in SAMPLING_FIELDS and k not in CALL_OPTIONS)
    if unknown:
        raise UsageError(f"{owner} does not know the argument(s) {', '.join(unknown)}; "
                         f"sampling: {', '.join(SAMPLING_FIELDS)}; also: {', '.join(sorted(CALL_OPTIONS))}")
    sampling = dict(base)
    sampling.update({k: v for k, v in kwargs.items() if k in SAMPLING_FIELDS and v is not None})
    if stop is not None:
        sampling["stop"] = list(stop)
    options = {k: v for k, v in kwargs.items() if k in CALL_OPTIONS and v is not None}
    return sampling, options


def usage_counts(result: GenerationResult) -> dict[str, int]:
    """Token counts of a finished request, in LangChain's ``token_usage`` spelling."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.output_tokens,
            "total_tokens": result.prompt_tokens + result.output_tokens}


# ----- waiting on handles (shared by the sync and async paths of both classes) -------------------

def wait_all(handles: list[RequestHandle], timeout: float | None) -> list[GenerationResult]:
    try:
        return [h.result(timeout=timeout) for h in handles]
    except BaseException:
        for h in handles:
            h.abort()
        raise


async def await_all(handles: list[RequestHandle], timeout: float | None) -> list[GenerationResult]:
    try:
        return list(await asyncio.wait_for(asyncio.gather(*(h.aresult() for h in handles)), timeout))
    except BaseException:
        for h in handles:
            h.abort()
        raise


def deltas(handle: RequestHandle, timeout: float | None) -> Iterator[str]:
    """Text deltas of the first answer; ``timeout`` bounds the wait for each one."""
    for index, text in handle.iter_deltas(timeout=timeout):
        if index == 0:
            yield text


async def adeltas(handle: RequestHandle, timeout: float | None) -> AsyncIterator[str]:
    iterator = handle.__aiter__()
    while True:
        try:
            text = await asyncio.wait_for(iterator.__anext__(), timeout)
        except StopAsyncIteration:
            return
        yield text
