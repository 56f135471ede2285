"""What the platform the engine runs on asks of its arguments: CPU or NVIDIA GPU defaults, the
CPU's compute threads, the CPU's compute dtype.

* :func:`platform_name`: ``"cpu"`` or vLLM's device type, decided once per process.
* :func:`platform_defaults`: the user's engine arguments over the platform's defaults (CPU: float32
  unless the weights are quantized for 16 bits, eager mode, a bounded KV cache, the model run inside
  the engine process; NVIDIA GPU: vLLM's own defaults plus sleep mode, and float32 for the float32
  checkpoints vllm-magic prepares, the demo model among them), and on CPU where the compute
  threads of each rank run.
* :func:`thread_binding_for_start`: that binding, in the environment while the engine starts.
"""

from __future__ import annotations

import contextlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Protocol

from ..errors import ConfigError
from .compat import device_type, quantization_act_dtypes

__all__ = ["platform_name", "platform_defaults", "cpu_thread_binding", "thread_binding_for_start", "world_size",
           "parallel_sizes", "THREADS_BIND_VARIABLE"]

GiB = 1 << 30
# About 1 GiB of KV cache on CPU: ~23k tokens of the demo model, and it leaves a 24 GiB machine
# plenty of room. VLLM_CPU_KVCACHE_SPACE (GiB) or --kv-cache-memory-bytes override it.
CPU_KV_CACHE_BYTES = 1 * GiB
#: Tokens per KV cache block on a CPU. vLLM's CPU default (128) lets its prefix cache serve prompts
#: only in whole blocks of 128 tokens: a conversation recomputed up to 127 tokens of its history every
#: turn, and a short prompt never hit the cache. 32 is the smallest its CPU attention takes; measured
#: on the demo model it decodes as fast (one stream) or faster (a batch of 16: 129 against 110 tok/s).
CPU_BLOCK_SIZE = 32
# On CPU vLLM reads gpu_memory_utilization as a fraction of RAM; its default 0.92 does not start
# on a 24 GiB machine that runs anything else.
CPU_MEMORY_FRACTION = 0.5
# vLLM's single-process executor, named by its import path: vLLM turns the short name "uni" into
# a separate worker process on CPU, but takes an executor class as given.
CPU_IN_PROCESS_EXECUTOR = "vllm.v1.executor.uniproc_executor.UniProcExecutor"


class _StartingEngine(Protocol):
    """What :func:`thread_binding_for_start` reads of an engine configuration."""

    platform: str
    cpu_threads: str | None


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
            f"{', '.join(parallel_sizes(engine_kwargs))} needs {ranks} CPU cores (one per rank), and this "
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


def parallel_sizes(engine_kwargs: dict[str, Any]) -> list[str]:
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
def thread_binding_for_start(config: _StartingEngine) -> Iterator[None]:
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


@lru_cache(maxsize=1)
def platform_name() -> str:
    """``"cpu"`` or vLLM's device type (``"cuda"``, ``"rocm"``, ...), decided once per process."""
    return device_type()


def platform_defaults(platform: str, model: str, user: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``(engine arguments, CPU thread binding)`` for ``model`` on ``platform``: the user's arguments
    over the platform's defaults, and where a CPU engine's compute threads run (None elsewhere).

    Raises :class:`ConfigError` when a CPU engine has more ranks than this process has cores.
    """
    if platform != "cpu":
        return _with_platform_defaults(platform, user, dtype=_prepared_float32(model, user)), None
    threads = cpu_thread_binding(user)
    return _with_platform_defaults(platform, user, threads, _cpu_dtype(model, user)), threads


def _cpu_dtype(model: str, user: dict[str, Any]) -> str:
    """The compute dtype for a CPU engine: float32 (bfloat16 gave wrong text from the demo model on
    x86 CPUs), unless the weights are quantized by a method that computes in 16 bits only (AWQ,
    GPTQ): then the checkpoint's own dtype where the method takes it, else the method's first."""
    checkpoint = _checkpoint_config(model)
    method = user.get("quantization") or (checkpoint.get("quantization_config") or {}).get("quant_method")
    if not method:
        return "float32"
    try:
        supported = quantization_act_dtypes(method)
    except Exception:  # an unknown method: vLLM says so when the engine starts
        return "float32"
    if not supported or "float32" in supported:
        return "float32"
    own = checkpoint.get("torch_dtype") or checkpoint.get("dtype")
    return own if own in supported else supported[0]


def _prepared_float32(model: str, user: dict[str, Any]) -> str | None:
    """``"float32"`` for an unquantized float32 checkpoint that vllm-magic prepared (the demo model and
    its variants), where the user gave no dtype; None otherwise. vLLM would run such a checkpoint in
    16 bits on a GPU, and the tutorials' greedy answers would then differ from a CPU's (float32)
    after a dozen tokens; in float32 the 135M demo model costs a GPU nothing worth saving."""
    if "dtype" in user or not (Path(model) / "vllm-magic-manifest.json").is_file():
        return None
    checkpoint = _checkpoint_config(model)
    if checkpoint.get("quantization_config"):
        return None
    return "float32" if (checkpoint.get("torch_dtype") or checkpoint.get("dtype")) == "float32" else None


def _checkpoint_config(model: str) -> dict[str, Any]:
    """A local model directory's config.json (empty for hub ids and unreadable files)."""
    try:
        return json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _with_platform_defaults(platform: str, user: dict[str, Any], threads: str | None = None,
                            dtype: str | None = None) -> dict[str, Any]:
    if platform == "cuda":
        if dtype:
            user = {"dtype": dtype, **user}
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
        "block_size": CPU_BLOCK_SIZE,
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
