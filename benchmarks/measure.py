"""Measuring tools: result rows, an engine-memory sampler, and a sampling pin for front-ends.

Everything here is front-end agnostic; ``frontends.py`` holds one function per way of asking for
text, ``run.py`` puts them in order.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

__all__ = ["Row", "Sample", "MemorySampler", "pinned_sampling", "best", "engine_memory_now"]


@dataclass
class Sample:
    """One timed run: the main value plus whatever else the run measured."""

    value: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Row:
    """One line of the results table."""

    group: str  # "batch", "ttft", "decode", "load", "memory"
    name: str  # the front-end or action, e.g. "session.submit"
    unit: str  # "tok/s", "ms", "s", "GiB"
    value: float | None = None
    baseline: str | None = None  # name of the row this one is compared with
    ratio: float | None = None  # median of ``ratios`` (older results: value / baseline value)
    target: str | None = None
    met: bool | None = None
    samples: list[float] = field(default_factory=list)
    note: str = ""
    available: bool = True
    ratios: list[float] = field(default_factory=list)  # one per interleaved run; ``ratio`` is their median
    tokens: list[int] = field(default_factory=list)  # output tokens of each sample
    failed: bool = False  # the front-end raised, or did not generate what raw vLLM generated
    run_id: str = ""  # the run that measured it (a table refuses rows of another run)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def best(values: list[float], higher_is_better: bool) -> float:
    """Best of several runs: on a shared machine the best run is the least disturbed one."""
    return max(values) if higher_is_better else min(values)


def median(values: list[float]) -> float:
    """The median (runs of a shared machine have outliers both ways)."""
    return statistics.median(values)


# ----- memory ------------------------------------------------------------------------------------

def _cuda_used_bytes() -> int | None:
    """Device memory in use on all GPUs, summed: an engine may span several (tensor parallel).

    NVML creates no CUDA context in this process; torch is the fallback where NVML is missing.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return sum(int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used)
                       for i in range(pynvml.nvmlDeviceGetCount()))
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return sum(int(total - free) for free, total in
                       (torch.cuda.mem_get_info(i) for i in range(torch.cuda.device_count())))
    except Exception:
        pass
    return None


def _children_rss_bytes() -> int:
    """RSS of every process this one started (the engine core and its workers)."""
    import psutil

    total = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" in " ".join(proc.cmdline()):
                continue
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def engine_memory_now(platform: str) -> tuple[int | None, str]:
    """(bytes, what they are): device memory in use on a GPU, engine processes' RSS on CPU."""
    if platform == "cuda":
        return _cuda_used_bytes(), "device memory in use"
    return _children_rss_bytes(), "RSS of engine processes"


class MemorySampler:
    """Samples engine memory in the background and keeps the peak of each named phase."""

    def __init__(self, platform: str, interval: float = 0.1) -> None:
        self.platform = platform
        self.kind = engine_memory_now(platform)[1]
        self.interval = interval
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self.marks: list[tuple[str, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory-sampler", daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    def set_phase(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()

    def mark(self, label: str) -> int | None:
        """Record the memory in use right now under ``label``; returns the bytes."""
        value = engine_memory_now(self.platform)[0]
        self.marks.append((label, value))
        return value

    def sample(self) -> None:
        value = engine_memory_now(self.platform)[0]
        if value is not None and value > self.peaks.get(self.phase, -1):
            self.peaks[self.phase] = value

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:
                pass


# ----- pinning the sampling of front-ends that do not expose every option ------------------------

@contextlib.contextmanager
def pinned_sampling(session: Any, captured: list | None = None, **values: Any) -> Iterator[list]:
    """Make every ``session.submit`` in the block use ``values`` (e.g. ``ignore_eos=True``).

    The front-ends all end in ``session.submit``; wrapping it (one extra Python call per submit)
    gives every one of them the same workload even where it has no flag for an option, and keeps
    the handles it created in ``captured`` so the harness can read their timings.
    """
    captured = [] if captured is None else captured
    original = session.submit

    def submit(prompts: Any, sampling: Any = None, **kwargs: Any) -> list:
        if sampling is not None:
            sampling = sampling.clone()
            for key, value in values.items():
                setattr(sampling, key, value)
        else:
            kwargs.update(values)
        handles = original(prompts, sampling, **kwargs)
        captured.extend(handles)
        return handles

    session.submit = submit
    try:
        yield captured
    finally:
        del session.submit


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def machine_description() -> str:
    """A short description of this machine: GPU name (and count), or CPU model and core count."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        finally:
            pynvml.nvmlShutdown()
        name = name.decode() if isinstance(name, bytes) else str(name)
        return name if count == 1 else f"{count} x {name}"
    except Exception:
        pass
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"
