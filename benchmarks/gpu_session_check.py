"""The engine session's check on a GPU: load, stream, switch twice, device memory around each switch.

    python -m benchmarks.gpu_session_check --model DIR [--engine-args JSON] [--switch-max-model-len N]
        [--json PATH]

Device memory is the memory in use on all GPUs, summed (NVML, as the session reads it), taken
before and after each step; a background sampler also records the lowest value during each switch,
which shows that the old engine's memory was given back before the new engine took its own.
Runs on CPU too (memory is then the RSS of the engine processes).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

GiB = float(1 << 30)


def _device_used() -> float | None:
    from .measure import engine_memory_now

    value, _ = engine_memory_now("cuda")
    return None if value is None else value / GiB


def _memory() -> float | None:
    used = _device_used()
    if used is not None:
        return used
    from .measure import engine_memory_now

    value, _ = engine_memory_now("cpu")
    return None if value is None else value / GiB


class _LowWater:
    """Lowest memory in use while a block runs (sampled every 20 ms)."""

    def __enter__(self) -> "_LowWater":
        self.low: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            value = _memory()
            if value is not None and (self.low is None or value < self.low):
                self.low = value

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(2)


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(_cmdline(p))}


def _cmdline(proc: Any) -> list[str]:
    try:
        return proc.cmdline()
    except Exception:
        return []


def _alive(pids: set[int]) -> int:
    import psutil

    return sum(1 for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)


def _stream(session: Any, prompt: str, max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    handle = session.submit(prompt, temperature=0.0, max_tokens=max_tokens, ignore_eos=True)[0]
    deltas, first_delta_at = [], None
    for delta in handle:
        if first_delta_at is None:
            first_delta_at = time.perf_counter()
            finished_at_first_delta = handle.done
        deltas.append(delta)
    result = handle.result()
    return {
        "deltas": len(deltas), "output_tokens": result.output_tokens,
        "deltas_concatenate_to_text": "".join(deltas) == result.text,
        "first_delta_before_finish": first_delta_at is not None and not finished_at_first_delta,
        "time_to_first_delta_ms": None if first_delta_at is None else (first_delta_at - start) * 1e3,
        "ttft_ms": None if result.ttft is None else result.ttft * 1e3,
        "tokens_per_second": result.tokens_per_second, "finish_reason": result.finish_reason,
    }


def check(model: str | None, engine_kwargs: dict, switch_len: int | None, tokens: int) -> dict[str, Any]:
    from vllm_magic import get_session

    session = get_session()
    report: dict[str, Any] = {"model": model, "engine_kwargs": engine_kwargs, "steps": []}

    def step(name: str, **data: Any) -> None:
        data = {"step": name, **data}
        report["steps"].append(data)
        print(json.dumps(data, default=str), flush=True)

    step("before load", memory_gib=_memory())
    start = time.perf_counter()
    info = session.load(model, **engine_kwargs)
    status = session.status()
    step("load", seconds=time.perf_counter() - start, summary=info.summary, memory_gib=_memory(),
         max_model_len=status.max_model_len, kv_cache_tokens=status.kv_cache_tokens, platform=status.platform,
         vllm=status.vllm_version, dtype=status.dtype)
    step("stream", **_stream(session, "Explain, step by step, how a rainbow forms.", tokens))
    start = time.perf_counter()
    again = session.load(model, **engine_kwargs)
    step("reload, same config", ms=(time.perf_counter() - start) * 1e3, already_loaded=again.already_loaded)

    original_len = status.max_model_len
    other_len = switch_len or max(256, original_len // 2)
    for name, length in (("switch 1", other_len), ("switch 2 (back)", original_len)):
        before_pids = _children()
        before = _memory()
        created = session.engines_created
        with _LowWater() as low:
            start = time.perf_counter()
            session.load(model, **{**engine_kwargs, "max_model_len": length})
            seconds = time.perf_counter() - start
        after = _memory()
        stream = _stream(session, "Name three colours of the rainbow.", min(tokens, 32))
        step(name, max_model_len=length, seconds=seconds, memory_before_gib=before, lowest_during_gib=low.low,
             memory_after_gib=after, new_engine=session.engines_created == created + 1,
             old_engine_processes_left=_alive(before_pids), stream_ok=stream["deltas_concatenate_to_text"],
             stream_tokens=stream["output_tokens"])
    start = time.perf_counter()
    pids = _children()
    session.unload()
    step("unload", seconds=time.perf_counter() - start, memory_gib=_memory(), engine_processes_left=_alive(pids))
    return report


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["| step | result | memory in use (GPU: device; CPU: engine processes' RSS) |", "|---|---|---|"]

    def gib(value: Any) -> str:
        return "n/a" if value is None else f"{value:.2f} GiB"

    for s in report["steps"]:
        name = s["step"]
        if name == "before load":
            lines.append(f"| before load | | {gib(s['memory_gib'])} |")
        elif name == "load":
            lines.append(f"| load | {s['summary']}; max_model_len {s['max_model_len']}, {s['seconds']:.1f} s | "
                         f"{gib(s['memory_gib'])} |")
        elif name == "stream":
            lines.append(f"| stream | {s['output_tokens']} tokens in {s['deltas']} deltas; deltas = text: "
                         f"{s['deltas_concatenate_to_text']}; first delta before finish: "
                         f"{s['first_delta_before_finish']}; TTFT {s['ttft_ms']:.1f} ms; "
                         f"{s['tokens_per_second']:.1f} tok/s | |")
        elif name == "reload, same config":
            lines.append(f"| reload, same config | {s['ms']:.2f} ms, already loaded: {s['already_loaded']} | |")
        elif name.startswith("switch"):
            lines.append(f"| {name}: max_model_len -> {s['max_model_len']} | {s['seconds']:.1f} s; new engine: "
                         f"{s['new_engine']}; old engine processes left: {s['old_engine_processes_left']}; "
                         f"stream after: {s['stream_ok']} | before {gib(s['memory_before_gib'])}, lowest during "
                         f"{gib(s['lowest_during_gib'])}, after {gib(s['memory_after_gib'])} |")
        elif name == "unload":
            lines.append(f"| unload | {s['seconds']:.1f} s; engine processes left: {s['engine_processes_left']} | "
                         f"{gib(s['memory_gib'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_session_check")
    p.add_argument("--model", default=None)
    p.add_argument("--engine-args", default="{}")
    p.add_argument("--switch-max-model-len", type=int, default=None)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    report = check(args.model, json.loads(args.engine_args), args.switch_max_model_len, args.tokens)
    report["markdown"] = to_markdown(report)
    print(report["markdown"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
