"""The one place that knows how vLLM's API moved between 0.26 and 0.33.

Everything else in vllm_magic imports these names from here instead of from vLLM directly.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from .config import import_vllm

import_vllm()  # the first import of vLLM prints notices: keep them in the engine log

try:  # vLLM >= 0.11 moved the parser into argparse_utils
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:  # pragma: no cover - older layout
    from vllm.utils import FlexibleArgumentParser  # type: ignore[no-redef]

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

try:
    from vllm.sampling_params import StructuredOutputsParams

    _STRUCTURED_FIELD = "structured_outputs"
except ImportError:  # pragma: no cover - before the rename, the same thing was "guided decoding"
    from vllm.sampling_params import GuidedDecodingParams as StructuredOutputsParams  # type: ignore

    _STRUCTURED_FIELD = "guided_decoding"

__all__ = [
    "FlexibleArgumentParser",
    "SamplingParams",
    "RequestOutputKind",
    "StructuredOutputsParams",
    "structured_outputs_kwargs",
    "abort_requests",
    "shutdown_engine",
    "tokens_prompt",
    "vllm_version",
    "interrupts_reach_engine_start",
    "sleep_engine",
    "wake_engine",
    "reload_weights",
    "reasoning_parser_class",
    "tool_parser_class",
    "chat_request",
    "has_thinking_budget",
]


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def structured_outputs_kwargs(*, json: Any = None, regex: str | None = None,
                              choice: list[str] | None = None) -> dict[str, Any]:
    """SamplingParams keyword arguments that constrain the output, or ``{}``."""
    spec = {k: v for k, v in {"json": json, "regex": regex, "choice": choice}.items() if v is not None}
    if not spec:
        return {}
    return {_STRUCTURED_FIELD: StructuredOutputsParams(**spec)}


def tokens_prompt(token_ids: list[int]) -> dict[str, Any]:
    """A prompt given as token ids (we tokenize ourselves to know lengths before submitting).

    vLLM 0.32 logs a one-time deprecation notice for raw prompt dicts in favour of its renderer
    objects; the dict form works through 0.33 and is the one 0.26 understands.
    """
    return {"prompt_token_ids": list(token_ids)}


def abort_requests(engine: Any, request_ids: list[str]) -> None:
    """Abort requests in an ``LLMEngine`` (vLLM 0.32 added an ``internal`` flag; positional works)."""
    if request_ids:
        engine.abort_request(list(request_ids))


def shutdown_engine(llm: Any) -> None:
    """Stop an ``LLM``'s engine core and its worker processes."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def sleep_engine(llm: Any, level: int) -> None:
    """Put an ``LLM`` started with ``enable_sleep_mode=True`` to sleep (1: weights to host RAM, KV
    cache discarded; 2: both discarded). vLLM 0.26 added a ``mode`` for requests still running;
    the caller aborts those first, so the default of every version does."""
    llm.sleep(level=level)


def wake_engine(llm: Any, tags: list[str] | None = None) -> None:
    """Give a sleeping ``LLM`` back its device memory (``tags``: only ``"weights"`` or
    ``"kv_cache"``; None: all of it)."""
    if tags is None:
        llm.wake_up()
    else:
        llm.wake_up(tags=tags)


def reload_weights(llm: Any) -> None:
    """Load the weights again from where they came from (after a level-2 sleep discarded them).

    The GPU worker's ``reload_weights`` exists from vLLM 0.11 on; it needs a loader that can read
    the weights again, so it refuses ``load_format="dummy"``.
    """
    llm.collective_rpc("reload_weights")


@contextlib.contextmanager
def interrupts_reach_engine_start() -> Iterator[None]:
    """While the block runs, an interrupt during vLLM's engine handshake is raised, not swallowed.

    vLLM opens the handshake socket of a starting engine with ``zmq_socket_ctx``, which catches
    ``KeyboardInterrupt`` and returns as if the handshake were done: the client then waits for a
    ready message that never comes, ``VLLM_ENGINE_READY_TIMEOUT_S`` (10 minutes) long, with the
    kernel's interrupt button doing nothing. Here that context manager lets the interrupt through.
    """
    import vllm.v1.engine.utils as engine_utils

    original = getattr(engine_utils, "zmq_socket_ctx", None)
    if original is None:  # another layout: nothing to mend
        yield
        return

    @contextlib.contextmanager
    def interruptible(*args: Any, **kwargs: Any) -> Iterator[Any]:
        interrupted = False
        with original(*args, **kwargs) as sock:
            try:
                yield sock
            except KeyboardInterrupt:
                interrupted = True  # vLLM's context manager swallows it and closes the socket
                raise
        if interrupted:
            raise KeyboardInterrupt

    engine_utils.zmq_socket_ctx = interruptible
    try:
        yield
    finally:
        engine_utils.zmq_socket_ctx = original


def reasoning_parser_class(name: str) -> Any:
    """vLLM's reasoning parser class registered as ``name`` (``--reasoning-parser``).

    Raises ``KeyError`` naming the registered parsers for an unknown name.
    """
    from vllm.reasoning import ReasoningParserManager

    try:
        return ReasoningParserManager.get_reasoning_parser(name)
    except KeyError:
        raise KeyError(", ".join(sorted(_registered(ReasoningParserManager, "reasoning_parsers")))) from None


def tool_parser_class(name: str) -> Any:
    """vLLM's tool parser class registered as ``name`` (``--tool-call-parser``); it moved from
    ``vllm.entrypoints.openai.tool_parsers`` to ``vllm.tool_parsers``."""
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError:  # pragma: no cover - the older layout
        from vllm.entrypoints.openai.tool_parsers import ToolParserManager  # type: ignore[no-redef]
    try:
        return ToolParserManager.get_tool_parser(name)
    except KeyError:
        raise KeyError(", ".join(sorted(_registered(ToolParserManager, "tool_parsers")))) from None


def _registered(manager: Any, attribute: str) -> list[str]:
    if hasattr(manager, "list_registered"):
        return list(manager.list_registered())
    return list(getattr(manager, attribute, {}))  # pragma: no cover - before list_registered


def chat_request(tools: list[dict[str, Any]] | None) -> Any:
    """A ``ChatCompletionRequest`` carrying ``tools``, as vLLM's parsers take one."""
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    except ImportError:  # pragma: no cover - before the protocol was split up
        from vllm.entrypoints.openai.protocol import ChatCompletionRequest  # type: ignore[no-redef]
    return ChatCompletionRequest(messages=[{"role": "user", "content": ""}], model="",
                                 tools=tools or None, tool_choice="auto" if tools else "none")


def has_thinking_budget() -> bool:
    """Whether this vLLM's ``SamplingParams`` takes ``thinking_token_budget`` (newer than 0.26)."""
    fields = getattr(SamplingParams, "__struct_fields__", None)  # a msgspec struct
    if fields is None:
        import inspect

        fields = inspect.signature(SamplingParams).parameters
    return "thinking_token_budget" in fields
