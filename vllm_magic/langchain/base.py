"""What ``VLLM`` and ``ChatVLLM`` share: engine fields, sampling fields, attaching to the session's
engine, one submit, and one streaming helper for the sync and the async path.

Neither class owns an engine. Their engine fields describe the engine they want; constructing one
attaches to the session's live engine when it serves that request (the session's one rule, as for
``%vllm_load``), and loads that configuration through the session otherwise (which replaces the
live engine: there is only ever one per process). Their sampling fields are generated from the
session's sampling options; unset ones follow the session's defaults.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
import warnings
from contextlib import contextmanager
from typing import Any, AsyncIterator, Iterator, Optional

from pydantic import AliasChoices, ConfigDict, Field, PrivateAttr, create_model, model_validator

from ..demo.model import DEMO_MODEL_NAME
from ..engine.config import EngineConfig
from ..engine.requests.handles import GenerationResult, RequestHandle
from ..engine.requests.sampling import SAMPLING_FIELDS, STRUCTURED_FIELDS, check_overrides, option_help, option_type
from ..engine.session import EngineSession, get_session
from ..errors import NoEngineError, RequestError

__all__ = ["EngineBase", "SamplingFields", "engine_request", "without_needless_fetch_args", "call_overrides",
           "usage_counts", "CALL_OPTIONS", "wait_all", "await_all", "parts", "aparts"]

#: Names under which the demo model can be asked for (besides ``None``).
DEMO_MODEL_ALIASES = frozenset({DEMO_MODEL_NAME, f"HuggingFaceTB/{DEMO_MODEL_NAME}"})

#: Keyword arguments a call may carry besides the sampling options.
CALL_OPTIONS = frozenset({"raw", "system", "chat_template_kwargs", "lora", *STRUCTURED_FIELDS})


def _sampling_field(name: str) -> tuple[Any, Any]:
    kind = option_type(name)
    annotation = Optional[list[str]] if kind is list else Optional[kind]
    aliases = {"validation_alias": AliasChoices("max_tokens", "max_new_tokens")} if name == "max_tokens" else {}
    return annotation, Field(default=None, description=f"{option_help(name)} None follows the session default.",
                             **aliases)


#: One optional field per sampling option (``temperature``, ``max_tokens`` alias ``max_new_tokens``,
#: ``stop``, ``n``, ...), generated from the session's sampling options.
SamplingFields = create_model("SamplingFields", __config__=ConfigDict(populate_by_name=True),
                              **{name: _sampling_field(name) for name in SAMPLING_FIELDS})


class EngineBase(SamplingFields):  # type: ignore[misc, valid-type]
    """Engine fields of ``langchain_community.llms.VLLM``, the sampling fields, and the engine."""

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
    persist: bool = False
    """Run the engine in a process of its own that outlives the kernel (as ``%vllm_load --persist``):
    after a restart, constructing the object again attaches to it in a moment. Without it, a running
    persisted engine that serves this object is attached to all the same."""
    timeout: float | None = None
    """Seconds to wait for an answer; the request is aborted in the engine after that. None: no limit."""
    lora: str | None = None
    """The LoRA adapter to answer with, by the name it was registered under (``%vllm_lora NAME
    PATH``, ``session.add_lora``); None or ``"base"``: the model without one. A call's
    ``lora=...`` wins over it. The engine needs ``vllm_kwargs={"enable_lora": True}``, or ``lora_path``."""
    lora_path: str | Path | None = None
    """The adapter's directory (peft's ``save_pretrained``): registered as ``lora`` when the object is
    built, on an engine loaded with ``enable_lora`` (and a ``max_lora_rank`` that takes the adapter)."""
    session: Any = Field(default=None, exclude=True)
    """The engine session to use; the kernel's (``vllm_magic.get_session()``) when None."""
    follow_live: bool = Field(default=False, exclude=True)
    """Use whatever engine the session has loaded (after ``%vllm_load`` of another model, that one)
    and never load one; the engine fields are then ignored. ``from_session()`` sets it."""

    _wanted: EngineConfig | None = PrivateAttr(default=None)

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
    def _attach_engine(self) -> "EngineBase":
        # As langchain_community's VLLM does, constructing the object makes its engine ready.
        if self.lora_path is not None and self.lora in (None, "base"):
            raise RequestError("lora_path is the directory of the adapter named by lora: give both, "
                               "e.g. lora='pirate', lora_path='/path/to/adapter'")
        if not self.follow_live:
            self._ensure_engine(load=True)
        if self.lora_path is not None:
            self.engine_session.add_lora(self.lora, self.lora_path)
        return self

    # ----- the engine -------------------------------------------------------------------------
    @property
    def engine_session(self) -> EngineSession:
        return self.session if self.session is not None else get_session()

    def _ensure_engine(self, *, load: bool) -> None:
        """Attach to the live engine when it serves this object, or load its configuration.

        At call time (``load=False``) an engine that does not fit is a mistake to report, not a
        reason to replace what the user loaded since.
        """
        session = self.engine_session
        if self._wanted is None:
            model, requested = engine_request(self.model, self.tensor_parallel_size, self.trust_remote_code,
                                              self.dtype, self.download_dir, self.vllm_kwargs)
            if self.lora_path is not None:  # an engine that runs the adapter
                requested = {**lora_engine_args(self.lora, self.lora_path), **requested}
            if model is not None:  # a Hub model's files first: fails in seconds, before vLLM is imported
                _download(session, model, requested)
            wanted = session.resolve(model, **requested)
            needed = without_needless_fetch_args(wanted.model, requested)
            if needed != requested:  # so that the engine it loads is the one %vllm_load would load
                wanted = session.resolve(model, **needed)
            self._wanted = wanted
        if session.serves(self._wanted):
            return
        live = session.config
        if live is not None and not load:
            raise RequestError(
                f"{type(self).__name__} was built for {self._wanted.short_name} but the live engine is "
                f"{live.short_name} with other arguments; build a new one (or {type(self).__name__}"
                ".from_session()) to use the live engine")
        session.load(self._wanted.model, persist=self.persist, **self._wanted.requested)

    def _live_session(self) -> EngineSession:
        """The session, with an engine that serves this object (reloaded after an unload)."""
        if not self.follow_live:
            self._ensure_engine(load=self.engine_session.config is None)
        return self.engine_session

    @classmethod
    def from_session(cls, session: EngineSession | None = None, **fields: Any):
        """An object that uses whatever engine ``session`` (the kernel's when None) has loaded.

        It follows the live engine: after ``%vllm_load`` of another model it uses that one, and it
        never loads anything itself. Other fields (sampling) can be given as keyword arguments.
        """
        session = session or get_session()
        live = session.config
        if live is None:
            raise NoEngineError("no model is loaded: run %vllm_load (the demo model) or %vllm_load MODEL first")
        model = DEMO_MODEL_NAME if _is_demo_dir(live.model) else live.model
        return cls(session=session, model=model, follow_live=True, **fields)

    @property
    def model_name(self) -> str:
        """The model's name as LangChain reports it (the demo model's short name, a Hub id, a path)."""
        session = self.engine_session
        if self.follow_live and session.config is not None:
            return session.config.short_name
        if self._wanted is not None:
            return self._wanted.short_name
        return self.model or DEMO_MODEL_NAME

    # ----- requests ---------------------------------------------------------------------------
    @property
    def _default_params(self) -> dict[str, Any]:
        """This object's sampling overrides: only the fields that are set (the rest follow the
        session's defaults). The only place they are assembled."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, **self._default_params,
                **({"lora": self.lora} if self.lora is not None else {})}

    def _submit(self, prompts: list[Any], stop: list[str] | None, kwargs: dict[str, Any], *, stream: bool,
                **options: Any) -> list[RequestHandle]:
        """Submit prompts with this object's sampling fields, the call's arguments over them;
        ``stream``: whether the caller reads the answers as they grow (``_stream``), not only whole."""
        sampling, call_options = call_overrides(self._default_params, stop, kwargs, type(self).__name__)
        if self.lora is not None:
            call_options.setdefault("lora", self.lora)
        return self._live_session().submit(prompts, **{**call_options, **options}, stream=stream, **sampling)

    def _chunk(self, text: str, handle: RequestHandle, last: bool) -> Any:
        """One streamed chunk; the last one (empty) reports the finished request."""
        raise NotImplementedError

    def _delta_chunks(self, text: str, reasoning: bool, handle: RequestHandle, reader: Any) -> list[Any]:
        """The chunks of one delta (``reasoning``: of the model's thinking); ``reader`` is what
        the subclass passed to :meth:`_stream_handle`. By default: the answer's text, one chunk."""
        return [] if reasoning else [self._chunk(text, handle, last=False)]

    def _last_chunks(self, handle: RequestHandle, reader: Any) -> list[Any]:
        """The chunks after the last delta: the (empty) one that reports the finished request."""
        return [self._chunk("", handle, last=True)]

    def _stream_handle(self, handle: RequestHandle, run_manager: Any, reader: Any = None) -> Iterator[Any]:
        """Chunks of ``handle`` as they arrive, reported to ``run_manager`` before each is yielded."""
        try:
            # Each delta goes out as soon as it arrives; usage and finish reason follow on a final
            # empty chunk (holding a delta back to mark it last would cost one decode step).
            for text, reasoning in parts(handle, self.timeout):
                for chunk in self._delta_chunks(text, reasoning, handle, reader):
                    if run_manager:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
            handle.result()
            for chunk in self._last_chunks(handle, reader):
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            handle.abort()  # a consumer that stops early frees the engine (no-op once finished)

    async def _astream_handle(self, handle: RequestHandle, run_manager: Any, reader: Any = None) -> AsyncIterator[Any]:
        """The async :meth:`_stream_handle`."""
        try:
            async for text, reasoning in aparts(handle, self.timeout):
                for chunk in self._delta_chunks(text, reasoning, handle, reader):
                    if run_manager:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
            await handle
            for chunk in self._last_chunks(handle, reader):
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            handle.abort()


def lora_engine_args(name: str, path: str | os.PathLike) -> dict[str, Any]:
    """The engine arguments that run the adapter in ``path``: ``enable_lora``, and a
    ``max_lora_rank`` over vLLM's default (16) where the adapter's rank needs it."""
    from ..engine.requests.adapters import engine_args_for, read_adapter

    return engine_args_for([read_adapter(name, path)])


def engine_request(model: str | None, tensor_parallel_size: int | None, trust_remote_code: bool | None,
                   dtype: str | None, download_dir: str | None,
                   vllm_kwargs: dict[str, Any] | None) -> tuple[str | None, dict[str, Any]]:
    """The ``session.load`` arguments for these engine fields: only values that differ from vLLM's
    defaults, so that ``VLLM(model=...)`` with langchain_community's defaults matches ``%vllm_load``."""
    requested = dict(vllm_kwargs or {})
    if requested.pop("model", None) is not None:
        raise RequestError("give the model as model=..., not inside vllm_kwargs")
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


def _download(session: EngineSession, model: str, requested: dict[str, Any]) -> None:
    """Fetch a Hub model that is not in the local cache, with the magics' progress line in a notebook
    (only then: a local directory or a cached model shows nothing)."""
    from ..hub import is_hub_model

    where = {"revision": requested.get("revision"), "download_dir": requested.get("download_dir")}
    if not is_hub_model(model) or session.hub_snapshot(model, **where) is not None:
        return
    progress = None
    try:
        from IPython import get_ipython

        from ..magics.display import LoadProgress, supports_updates

        shell = get_ipython()
        progress = LoadProgress(supports_updates(shell)) if shell is not None else None
    except ImportError:
        pass
    try:
        session.download(model, progress=progress, **where)
    finally:
        if progress is not None:
            progress.close()


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


def _is_demo_dir(path: str) -> bool:
    from ..demo.model import demo_model_dir

    try:
        return os.path.samefile(path, demo_model_dir())
    except OSError:
        return False


def call_overrides(base: dict[str, Any], stop: list[str] | None, kwargs: dict[str, Any],
                   owner: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge a call's keyword arguments over an object's sampling overrides.

    Returns ``(sampling_overrides, call_options)``; ``stop`` given at call time wins over the
    object's. Unknown keywords are a :class:`RequestError` rather than silently ignored.
    """
    kwargs = dict(kwargs)
    if "max_new_tokens" in kwargs:
        kwargs.setdefault("max_tokens", kwargs.pop("max_new_tokens"))
    check_overrides({k: v for k, v in kwargs.items() if k not in CALL_OPTIONS}, owner)
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

@contextmanager
def _aborted_on_failure(handles: list[RequestHandle]) -> Iterator[None]:
    """A wait that fails (an error, a timeout, Ctrl-C, a cancelled task) stops its requests first."""
    try:
        yield
    except BaseException:
        for h in handles:
            h.abort()
        raise


def wait_all(handles: list[RequestHandle], timeout: float | None) -> list[GenerationResult]:
    with _aborted_on_failure(handles):
        return [h.result(timeout=timeout) for h in handles]


async def await_all(handles: list[RequestHandle], timeout: float | None) -> list[GenerationResult]:
    with _aborted_on_failure(handles):
        return list(await asyncio.wait_for(asyncio.gather(*(h.aresult() for h in handles)), timeout))


def parts(handle: RequestHandle, timeout: float | None) -> Iterator[tuple[str, bool]]:
    """``(text, is_reasoning)`` deltas of the first answer; ``timeout`` bounds the wait for each one."""
    for index, text, reasoning in handle.iter_parts(timeout=timeout):
        if index == 0:
            yield text, reasoning


async def aparts(handle: RequestHandle, timeout: float | None) -> AsyncIterator[tuple[str, bool]]:
    """The async :func:`parts`."""
    iterator = handle.aiter_parts()
    while True:
        try:
            text = await asyncio.wait_for(iterator.__anext__(), timeout)
        except StopAsyncIteration:
            return
        yield text
