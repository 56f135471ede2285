"""A GPU that notebooks share: how much of it an engine takes, and who holds the rest.

vLLM's default gives one engine 92% of the card, and a KV cache for millions of tokens of a small
model: a second notebook (or PyTorch work beside the engine) then finds no room. An engine that
vllm-magic starts on an NVIDIA GPU takes what its work needs instead (:func:`plan`):

* a KV cache for ``concurrency`` sequences of the full context length (default
  :data:`DEFAULT_CONCURRENCY`; ``%vllm_load MODEL --concurrency 64`` raises it), but never more than
  half the memory that is free at load once the weights are in, and always one full sequence;
* vLLM's start-up check (free memory >= ``gpu_memory_utilization`` x the card) set to what is free.

``--gpu-memory-utilization`` given by the user is vLLM's own sizing, as ``vllm serve`` does it;
``--kv-cache-memory-bytes`` alone sets the KV cache and keeps the rest of this plan.

A start that cannot fit is refused in one line before anything starts (:class:`DoesNotFit`):
how much is free, who holds the rest (NVML's processes, named as kernels or persisted engines of
this user where they are), and what to pass. NVML is read directly: no CUDA context is created.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import EngineStartError

__all__ = ["DEFAULT_CONCURRENCY", "MemoryPlan", "DoesNotFit", "CardMemory", "plan", "cards", "holders",
           "device_memory_used", "gpu_memory_of", "memory_error_line", "estimate_weight_bytes"]

GiB = 1 << 30
#: Full-length sequences the default KV cache holds (``--concurrency``).
DEFAULT_CONCURRENCY = 16
#: What an engine holds besides weights and KV cache: the CUDA context, activations of a
#: notebook-sized batch, CUDA graphs, sampler buffers (1.2-1.8 GiB measured on an H100).
OVERHEAD_BYTES = 2 * GiB
#: Of the memory free at load after the weights, the default KV cache takes at most this share.
FREE_SHARE = 0.5
#: vLLM's start-up check is set this far below the free memory (NVML's and CUDA's counts differ a bit).
CHECK_MARGIN = 0.98


class DoesNotFit(EngineStartError):
    """An engine that cannot fit in the GPU memory free now, said in one line."""


@dataclass(frozen=True)
class CardMemory:
    """One GPU's memory, as NVML reports it."""

    index: int
    free: int
    total: int

    def describe(self) -> str:
        return f"GPU {self.index}: {self.free / GiB:.1f} of {self.total / GiB:.1f} GiB free"


@dataclass(frozen=True)
class MemoryPlan:
    """How much of the GPU an engine takes (per rank): what vLLM is passed, and why."""

    kv_cache_bytes: int
    max_model_len: int
    per_token_bytes: int
    concurrency: int
    weight_bytes: int | None
    card: CardMemory
    #: The KV cache was held below ``concurrency`` full sequences by the free memory.
    capped: bool

    @property
    def sequences(self) -> float:
        """Full-length sequences the KV cache holds."""
        return self.kv_cache_bytes / max(1, self.per_token_bytes * self.max_model_len)

    def engine_kwargs(self) -> dict[str, Any]:
        """The vLLM engine arguments that carry this plan."""
        utilization = round(min(0.92, self.card.free * CHECK_MARGIN / self.card.total), 4)
        return {"kv_cache_memory_bytes": int(self.kv_cache_bytes), "gpu_memory_utilization": utilization}

    def describe(self) -> str:
        """``"KV cache 8.0 GiB (16 sequences of 4,096 tokens)"``."""
        held = (f"{self.sequences:.1f} sequences" if self.capped else f"{self.concurrency} sequences")
        why = ", held by the free memory" if self.capped else ""
        return f"KV cache {self.kv_cache_bytes / GiB:.1f} GiB ({held} of {self.max_model_len:,} tokens{why})"


def plan(config: Any, log: Any = None) -> MemoryPlan | None:
    """The memory plan for starting ``config`` (an ``EngineConfig``) now, or None where vLLM sizes
    the engine itself (not an NVIDIA GPU, or ``gpu_memory_utilization`` given).

    Raises :class:`DoesNotFit` when the weights and one full-length sequence do not fit in the
    memory free now.
    """
    kwargs = config.engine_kwargs
    if config.platform != "cuda" or "gpu_memory_utilization" in kwargs:
        return None
    from .platform import world_size

    visible = cards()[:max(1, world_size(kwargs))]
    if not visible:
        return None  # NVML unreadable: vLLM's own sizing
    card = min(visible, key=lambda c: c.free)
    shape = _engine_shape(config, log)
    if shape is None:
        return None
    max_model_len, per_token, weights = shape
    concurrency = int(kwargs.get("concurrency") or DEFAULT_CONCURRENCY)
    one = per_token * max_model_len
    room = card.free - (weights or 0) - OVERHEAD_BYTES
    if "kv_cache_memory_bytes" in kwargs:
        kv, capped = int(kwargs["kv_cache_memory_bytes"]), False
    else:
        wanted = one * concurrency
        kv = int(min(wanted, max(one, room * FREE_SHARE)))
        capped = kv < wanted
    result = MemoryPlan(kv, max_model_len, per_token, concurrency, weights, card, capped)
    if room < kv:
        raise DoesNotFit(does_not_fit_line(config, result))
    return result


def does_not_fit_line(config: Any, plan: MemoryPlan | None, card: CardMemory | None = None) -> str:
    """One line: what the engine needs, what is free, who holds the rest, what to pass."""
    card = plan.card if plan is not None else card
    name = config.short_name
    if card is None:
        return (f"{name} does not fit in the GPU memory free now: free some (%vllm_unload or %vllm_sleep in "
                "other notebooks), or pass --max-model-len or --concurrency lower")
    need = ""
    advice = ["free some (%vllm_unload or %vllm_sleep in the notebooks that hold it)"]
    if plan is not None:
        weights = plan.weight_bytes or 0
        need = (f": it needs about {(weights + plan.kv_cache_bytes + OVERHEAD_BYTES) / GiB:.1f} GiB "
                f"({weights / GiB:.1f} of weights, {plan.kv_cache_bytes / GiB:.1f} of KV cache for "
                f"{plan.sequences:g} sequence(s) of {plan.max_model_len:,} tokens, {OVERHEAD_BYTES / GiB:.0f} of overhead)")
        room = card.free - weights - OVERHEAD_BYTES
        fits = (room // plan.per_token_bytes) // 256 * 256 if room > 0 else 0
        if 256 <= fits < plan.max_model_len:
            advice.append(f"pass --max-model-len {fits}")
        elif plan.concurrency > 1 and "kv_cache_memory_bytes" not in config.engine_kwargs:
            advice.append("pass --concurrency 1")
    held = ", ".join(h.describe() for h in holders(card.index)) or "no process NVML can see"
    return (f"{name} does not fit on GPU {card.index}{need}; {card.free / GiB:.1f} of {card.total / GiB:.1f} GiB "
            f"are free, held by {held}. To load it: {', or '.join(advice)}")


#: Words of vLLM's and PyTorch's errors for an engine that ran out of GPU memory while starting.
_MEMORY_ERRORS = ("Free memory on device", "CUDA out of memory", "No available memory for the cache blocks",
                  "KV cache is needed, which is larger than the available", "OutOfMemoryError")


def memory_error_line(config: Any, message: str, plan: MemoryPlan | None) -> str | None:
    """The one-line :func:`does_not_fit_line` for a start that failed for lack of GPU memory, or None."""
    if config.platform != "cuda" or not any(words in message for words in _MEMORY_ERRORS):
        return None
    if plan is not None:
        return does_not_fit_line(config, plan)
    visible = cards()
    return does_not_fit_line(config, None, visible[0] if visible else None)


def _engine_shape(config: Any, log: Any) -> tuple[int, int, int | None] | None:
    """``(max model length, KV bytes per token per rank, weight bytes per rank or None)``, read from
    vLLM's own configuration of the engine (nothing is started), or None when vLLM cannot say."""
    from .compat import EngineArgs

    kwargs = config.llm_kwargs()
    try:
        with log.capture(False) if log is not None else contextlib.nullcontext():
            vllm_config = EngineArgs(**kwargs).create_engine_config()
    except Exception:  # noqa: BLE001 - vLLM refuses it: the start says why, in vLLM's words
        return None
    model, parallel, cache = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    try:
        layers = model.get_num_layers(parallel)
        heads = model.get_num_kv_heads(parallel)
        head = model.get_head_size()
    except Exception:  # noqa: BLE001 - an architecture vLLM describes otherwise: its own sizing
        return None
    width = _dtype_bytes(cache.cache_dtype if cache.cache_dtype not in (None, "auto") else model.dtype)
    per_token = (1 if getattr(model, "use_mla", False) else 2) * layers * heads * head * width
    weights = estimate_weight_bytes(config.files, kwargs.get("load_format"), str(model.dtype))
    ranks = int(parallel.tensor_parallel_size or 1) * int(parallel.pipeline_parallel_size or 1)
    return int(model.max_model_len), int(per_token), None if weights is None else weights // ranks


def estimate_weight_bytes(model: str, load_format: str | None, dtype: str) -> int | None:
    """About how many bytes a model's weights take on the device: the size of its weight files, or
    for dummy weights a count of a Llama-like model's parameters from ``config.json``; None when
    neither can be read."""
    path = Path(model)
    if not path.is_dir():
        return None
    if load_format != "dummy":
        size = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt", "*.gguf")
                   for f in path.glob(pattern))
        if size:
            return size
    try:
        cfg = json.loads((path / "config.json").read_text())
        hidden, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads", heads)
        head_dim = cfg.get("head_dim") or hidden // heads
        mlp = cfg.get("intermediate_size", 4 * hidden)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    params = layers * (attention + 3 * hidden * mlp) + vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    width = 4 if "32" in dtype else 2
    return params * width


def _dtype_bytes(dtype: Any) -> int:
    text = str(dtype).replace("torch.", "")
    if "fp8" in text or "int8" in text or "uint8" in text:
        return 1
    return 4 if "32" in text else 2


# ----- NVML -----------------------------------------------------------------------------------------

def _nvml() -> Any:
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def _visible_indices(pynvml: Any) -> list[int]:
    """NVML indices of the GPUs this process may use, in CUDA's order (``CUDA_VISIBLE_DEVICES``)."""
    count = pynvml.nvmlDeviceGetCount()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    indices: list[int] = []
    for item in (v.strip() for v in visible.split(",")):
        if not item:
            continue
        if item.isdigit():
            if int(item) < count:
                indices.append(int(item))
            continue
        for index in range(count):  # a UUID (or its prefix)
            uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            if uuid.startswith(item) or uuid.startswith("GPU-" + item):
                indices.append(index)
                break
    return indices


def cards() -> list[CardMemory]:
    """The memory of each GPU this process may use, in CUDA's order; empty without NVML."""
    try:
        pynvml = _nvml()
    except Exception:  # noqa: BLE001 - no NVML (CPU machines) or no driver
        return []
    try:
        result = []
        for index in _visible_indices(pynvml):
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            result.append(CardMemory(index, int(info.free), int(info.total)))
        return result
    except Exception:  # noqa: BLE001
        return []
    finally:
        pynvml.nvmlShutdown()


def device_memory_used(platform: str) -> int | None:
    """Bytes in use on all NVIDIA GPUs together, through NVML (creates no CUDA context), or None."""
    if platform != "cuda":
        return None
    try:
        pynvml = _nvml()
    except Exception:  # noqa: BLE001
        return None
    try:
        return sum(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used
                   for i in range(pynvml.nvmlDeviceGetCount()))
    except Exception:  # noqa: BLE001
        return None
    finally:
        pynvml.nvmlShutdown()


def _processes(index: int | None = None) -> Iterator[tuple[int, int]]:
    """``(pid, bytes)`` of the processes holding GPU memory (one GPU, or all)."""
    try:
        pynvml = _nvml()
    except Exception:  # noqa: BLE001
        return iter(())
    try:
        found: list[tuple[int, int]] = []
        indices = range(pynvml.nvmlDeviceGetCount()) if index is None else [index]
        for i in indices:
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i)):
                found.append((int(proc.pid), int(proc.usedGpuMemory or 0)))
        return iter(found)
    except Exception:  # noqa: BLE001
        return iter(())
    finally:
        pynvml.nvmlShutdown()


def gpu_memory_of(pids: Sequence[int]) -> int | None:
    """GPU memory that the processes ``pids`` hold on all NVIDIA GPUs (NVML), or None."""
    wanted = set(pids)
    total = sum(used for pid, used in _processes() if pid in wanted)
    return total or None


@dataclass(frozen=True)
class Holder:
    """A process that holds GPU memory, named as people know it."""

    pid: int
    used: int
    who: str

    def describe(self) -> str:
        return f"{self.who} ({self.used / GiB:.1f} GiB)"


def holders(index: int) -> list[Holder]:
    """Who holds memory on GPU ``index``, largest first: this kernel, other kernels and persisted
    engines of this user by name, other processes by pid and program."""
    found: dict[str, Holder] = {}
    for pid, used in _processes(index):
        who = _who(pid)
        before = found.get(who)
        found[who] = Holder(pid, used + (before.used if before else 0), who)
    return sorted(found.values(), key=lambda h: -h.used)


def _who(pid: int) -> str:
    try:
        import psutil

        proc = psutil.Process(pid)
        chain = [proc, *proc.parents()]
    except Exception:  # noqa: BLE001 - another user's process, or a pid from another namespace
        return f"pid {pid}"
    me = os.getpid()
    for ancestor in chain:
        if ancestor.pid == me:
            return "this kernel"
        kernel = _kernel_id(ancestor)
        if kernel is not None:
            return f"kernel {kernel[:8]} (pid {ancestor.pid})" if kernel else f"a kernel (pid {ancestor.pid})"
    for ancestor in chain:
        model = _persisted_model(ancestor)
        if model is not None:
            return f"a persisted engine of {model} (pid {ancestor.pid})"
    try:
        name, user = proc.name(), proc.username()
    except Exception:  # noqa: BLE001
        return f"pid {pid}"
    return f"pid {pid} {name} ({user})"


def _kernel_id(proc: Any) -> str | None:
    """The Jupyter kernel id of a kernel process (``-f .../kernel-ID.json`` on its command line), ""
    for a kernel started with another connection file, None for a process that is no kernel."""
    try:
        cmdline = proc.cmdline()
    except Exception:  # noqa: BLE001
        return None
    if not any("ipykernel" in part for part in cmdline):
        return None
    for part in cmdline:
        base = os.path.basename(part)
        if base.startswith("kernel-") and base.endswith(".json"):
            return base[len("kernel-"):-len(".json")]
    return ""


def _persisted_model(proc: Any) -> str | None:
    """The model a persisted engine's server process serves (``%vllm_load --persist``), or None for
    any other process (read from its command line: the registry sits above this module)."""
    try:
        cmdline = proc.cmdline()
    except Exception:  # noqa: BLE001
        return None
    if not any(part.endswith("persisted_process") for part in cmdline):
        return None
    for flag in ("--served-model-name", "--model"):
        if flag in cmdline[:-1]:
            return os.path.basename(cmdline[cmdline.index(flag) + 1].rstrip("/"))
    return "a model"
