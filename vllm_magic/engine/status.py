"""What the session shows: ``%vllm_status``'s snapshot, the load line, and the sleeping engines kept.

Pure data and text: the session fills these from its backends (:func:`loaded_line`,
:func:`woken_line`, :func:`kept_engine`); the magics and widgets only render them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from .backends.base import Backend, SleepReport, UnloadReport
from .config import EngineConfig, short_model_name
from .flags import format_duration

__all__ = ["LoadInfo", "KeptEngine", "SessionStatus", "UnloadReport", "loaded_line", "woken_line", "kept_engine",
           "gpu_line"]

GiB = 1 << 30


@dataclass
class LoadInfo:
    """What ``load()`` did."""

    config: EngineConfig
    already_loaded: bool
    seconds: float
    summary: str
    #: What happened to the engine that was loaded before (``keep=True``), in one line, or None.
    kept: str | None = None
    #: Whether the engine was a sleeping one, woken instead of started.
    woken: bool = False
    #: A line about something noticed on the way (a persisted engine found dead and replaced), or None.
    note: str | None = None
    #: Whether a persisted engine that was running already was attached to, instead of a start.
    attached: bool = False


@dataclass
class KeptEngine:
    """A sleeping engine the session keeps for a later ``load()`` (``%vllm_status`` lists them)."""

    model: str
    level: int
    since: float
    holds: str
    host_bytes: int | None
    engine_args: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        host = "" if self.host_bytes is None else f", {self.host_bytes / GiB:.1f} GiB of host RAM"
        args = ", ".join(f"{k}={v}" for k, v in sorted(self.engine_args.items()) if k != "enable_sleep_mode")
        return (f"`{short_model_name(self.model)}` asleep (level {self.level}, {time.monotonic() - self.since:.0f} s): "
                f"{self.holds}{host}" + (f"; {args}" if args else ""))


@dataclass
class SessionStatus:
    """A snapshot of the session, as ``%vllm_status`` shows it."""

    loaded: bool
    model: str | None = None
    platform: str | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    memory_bytes: int | None = None
    memory_kind: str | None = None
    uptime: float | None = None
    load_seconds: float | None = None
    submissions: int = 0
    requests_served: int = 0
    tokens_out: int = 0
    requests_live: int = 0
    vllm_version: str | None = None
    fingerprint: str | None = None
    log_path: str | None = None
    #: Why the loaded engine cannot serve any more (its process died), or None while it is healthy.
    dead: str | None = None
    #: The URL of the vLLM server the session is attached to (``%vllm_load --remote``), or None.
    server: str | None = None
    #: The sleep the loaded engine is in (``%vllm_sleep``), or None while it is awake.
    asleep: SleepReport | None = None
    #: Sleeping engines kept for switching back (``%vllm_load --keep``), most recent first.
    kept: list[KeptEngine] = field(default_factory=list)
    #: For a persisted engine (one that outlives its kernel): since when, which kernels, when it ends.
    persisted: str | None = None
    #: NVIDIA GPU: how the engine was sized (its KV cache) and each card's free memory, or None.
    gpu: str | None = None
    #: The LoRA adapters requests can name (``%vllm_lora``), one line each; None where the engine
    #: runs none (loaded without ``--enable-lora``).
    adapters: list[str] | None = None
    #: The embedding engine beside it (``%vllm_load --embed``), in one line, or None.
    embedder: str | None = None

    def _repr_markdown_(self) -> str:
        kept = "".join(f"\n- {k.describe()}" for k in self.kept)
        kept = f"\n\nSleeping engines (`%vllm_load` of one wakes it; `%vllm_unload` frees all):{kept}" if kept else ""
        embedder = (f"\n\nEmbedding engine (`%vllm_unload --embed` frees it): {self.embedder}" if self.embedder
                    else "")
        return self._main_markdown() + kept + embedder

    def _main_markdown(self) -> str:
        if not self.loaded:
            return "**vllm-magic**: no engine loaded. Run `%vllm_load` (demo model) or `%vllm_load MODEL`."
        if self.dead and self.server:
            return (f"**vllm-magic**: {self.dead}. Start the server again, or attach another with "
                    "`%vllm_load --remote URL`.")
        if self.dead:
            return (f"**vllm-magic**: the engine of `{self.model}` is dead ({self.dead}). "
                    "Run `%vllm_load` to start it again; `%vllm_log` shows why it died.")
        mem = "n/a" if self.memory_bytes is None else f"{self.memory_bytes / 2**30:.2f} GiB ({self.memory_kind})"
        state = "awake"
        if self.asleep is not None:
            freed = self.asleep.freed_bytes
            state = (f"asleep (level {self.asleep.level}): {self.asleep.holds}"
                     + ("" if freed is None else f"; {freed / GiB:.2f} GiB of GPU memory freed")
                     + "; %vllm_wake or the next request wakes it")
        rows = [
            ("model", f"`{self.model}`"), ("state", state), ("platform", self.platform),
            *([("persisted", self.persisted)] if self.persisted else []),
            *([("server", self.server)] if self.server else []), ("vLLM", self.vllm_version),
            ("dtype", self.dtype), ("max model len", self.max_model_len),
            ("KV cache", f"{self.kv_cache_tokens} tokens" if self.kv_cache_tokens else "n/a"),
            ("memory", mem), *([("GPU", self.gpu)] if self.gpu else []), ("uptime", f"{self.uptime:.0f} s"), ("load time", f"{self.load_seconds:.1f} s"),
            ("requests served", self.requests_served), ("tokens out", self.tokens_out),
            ("requests running", self.requests_live),
            *([("LoRA adapters", "; ".join(self.adapters) or "none registered (%vllm_lora NAME PATH)")]
              if self.adapters is not None else []),
            ("engine args", ", ".join(f"{k}={v}" for k, v in sorted(self.engine_args.items())) or "-"),
        ]
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)

    def __repr__(self) -> str:
        if not self.loaded:
            return "SessionStatus(loaded=False)"
        if self.dead:
            return f"SessionStatus(model={self.model!r}, dead={self.dead!r})"
        if self.asleep is not None:
            return f"SessionStatus(model={self.model!r}, asleep=level {self.asleep.level}, kept={len(self.kept)})"
        return (f"SessionStatus(model={self.model!r}, platform={self.platform!r}, requests_served="
                f"{self.requests_served}, tokens_out={self.tokens_out})")


def gpu_line(backend: Backend) -> str | None:
    """The status's GPU row: the engine's KV cache sizing (where vllm-magic sized it) and the free
    memory of each card, or None off NVIDIA GPUs."""
    if backend.config.platform != "cuda":
        return None
    from .gpu_memory import cards

    plan = backend.memory_plan
    parts = [plan.describe() + "; --concurrency N or --gpu-memory-utilization F sizes it"] if plan else []
    parts += [card.describe() for card in cards()]
    return "; ".join(parts) or None


def woken_line(backend: Backend, seconds: float) -> str:
    """The load line of an engine woken instead of started."""
    return f"{backend.config.short_name} woken from sleep in {seconds:.1f} s ({backend.config.platform}, {backend.dtype})"


def loaded_line(backend: Backend, already: bool = False, attached: bool = False) -> str:
    """The load line: what runs where, how, and how long it took (or that it was already there)."""
    name, platform = backend.config.short_name, backend.config.platform
    engine = backend.persisted
    if engine is not None:
        if already:
            return f"{name} already attached (persisted engine on {platform}, pid {engine.pid})"
        if attached:
            others = len([k for k in engine.kernels() if k.get("pid") != os.getpid()])
            return (f"{name} attached to the persisted engine on {platform} (running for "
                    f"{format_duration(time.time() - engine.started)}, {others} other kernel(s) attached) "
                    f"in {backend.load_seconds:.1f} s")
        ends = ("it runs until %vllm_unload --stop" if engine.idle_timeout is None else
                f"it ends {format_duration(engine.idle_timeout)} after the last kernel detached, or with "
                "%vllm_unload --stop")
        return (f"{name} loaded on {platform} in a persisted engine in {backend.load_seconds:.1f} s: it outlives "
                f"this kernel ({ends})")
    if backend.kind == "remote":
        url = backend.url
        if already:
            return f"{name} already attached (vLLM server at {url})"
        return (f"{name} on the vLLM server at {url} (vLLM {backend.vllm_version}, context "
                f"{backend.max_model_len:,} tokens), attached in {backend.load_seconds:.1f} s")
    if already:  # the arguments it was loaded with: a request that leaves them open keeps them
        given = "".join(f", {k}={v}" for k, v in sorted(backend.config.requested.items()))
        return f"{name} already loaded ({platform}, {backend.dtype}{given})"
    kv = f", KV cache {backend.kv_cache_tokens:,} tokens" if backend.kv_cache_tokens else ""
    quantized = backend.config.engine_kwargs.get("quantization") or backend.quantization
    split = backend.config.parallel_summary
    shape = "".join(f", {part}" for part in (quantized, split) if part)
    return f"{name} loaded on {platform} ({backend.dtype}{shape}{kv}) in {backend.load_seconds:.1f} s"


def kept_engine(backend: Backend) -> KeptEngine:
    """How a sleeping engine kept for switching back is listed."""
    report = backend.asleep
    host = backend.host_memory() if report is not None and report.level == 1 else None
    return KeptEngine(backend.config.model, report.level if report else 0, report.since if report else 0.0,
                      report.holds if report else "", host, dict(backend.config.requested))

