"""A notebook's day on a GPU, five times over: load -> stream -> switch model -> unload.

    python -m benchmarks.gpu_scenario --model-a DIR --model-b DIR [--engine-args JSON]
        [--engine-args-b JSON] [--rounds 5] [--label NAME] [--json PATH]

Free device memory (NVML, all GPUs summed) is read before and after every step. After every unload
free memory must be back within 0.5 GiB of what it was before the first load, and during every
switch the old engine's memory must be given back (free memory back within 0.5 GiB of the start)
before the new engine takes its own; the script exits 1 when either fails. Load and switch times
are in the report, with vLLM's default mode or whatever ``--engine-args`` says (``enforce_eager``).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

GiB = float(1 << 30)
TOLERANCE_GIB = 0.5


def free_gib() -> float:
    """Free device memory on all NVIDIA GPUs together, in GiB (NVML: no CUDA context here)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        return sum(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).free
                   for i in range(pynvml.nvmlDeviceGetCount())) / GiB
    finally:
        pynvml.nvmlShutdown()


class HighFree:
    """The most free memory seen while a block runs (sampled every 20 ms): during a switch, the
    moment between the old engine's exit and the new engine's start."""

    def __enter__(self) -> "HighFree":
        self.high = free_gib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.high = max(self.high, free_gib())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(2)


def stream(session: Any, tokens: int) -> dict[str, Any]:
    handle = session.submit("Tell a short story about a lighthouse.", temperature=0.0, max_tokens=tokens,
                            ignore_eos=True)[0]
    deltas = sum(1 for _ in handle)
    result = handle.result()
    return {"deltas": deltas, "tokens": result.output_tokens, "tok_s": round(result.tokens_per_second or 0, 1)}


def scenario(model_a: str, model_b: str, engine_kwargs: dict, rounds: int, tokens: int,
             extra_b: dict | None = None) -> dict[str, Any]:
    from vllm_magic import get_session

    session = get_session()
    start_free = free_gib()
    steps: list[dict[str, Any]] = []
    failures: list[str] = []

    def record(**data: Any) -> None:
        steps.append(data)
        print(json.dumps(data), flush=True)

    record(step="start", free_gib=round(start_free, 2))
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        session.load(model_a, **engine_kwargs)
        record(round=r, step="load A", seconds=round(time.perf_counter() - t0, 1), free_gib=round(free_gib(), 2),
               **stream(session, tokens))
        with HighFree() as during:
            t0 = time.perf_counter()
            session.load(model_b, **{**engine_kwargs, **(extra_b or {})})
            seconds = time.perf_counter() - t0
        returned = during.high >= start_free - TOLERANCE_GIB
        if not returned:
            failures.append(f"round {r}: switch: free memory only reached {during.high:.2f} GiB "
                            f"(start {start_free:.2f} GiB)")
        record(round=r, step="switch to B", seconds=round(seconds, 1), highest_free_during_gib=round(during.high, 2),
               returned=returned, free_gib=round(free_gib(), 2), **stream(session, tokens))
        t0 = time.perf_counter()
        session.unload()
        after = free_gib()
        returned = after >= start_free - TOLERANCE_GIB
        if not returned:
            failures.append(f"round {r}: unload: free memory {after:.2f} GiB (start {start_free:.2f} GiB)")
        record(round=r, step="unload", seconds=round(time.perf_counter() - t0, 1), free_gib=round(after, 2),
               returned=returned)
    return {"model_a": model_a, "model_b": model_b, "engine_kwargs": engine_kwargs, "rounds": rounds,
            "start_free_gib": start_free, "steps": steps, "failures": failures}


def to_markdown(report: dict[str, Any], label: str) -> str:
    lines = [f"**{label}** (free device memory at start {report['start_free_gib']:.2f} GiB; "
             f"must return within {TOLERANCE_GIB} GiB)", "",
             "| round | load A | switch to B (highest free during) | unload (free after) | streams (tok/s A, B) |",
             "|---|---|---|---|---|"]
    by_round: dict[int, dict[str, dict]] = {}
    for s in report["steps"]:
        if "round" in s:
            by_round.setdefault(s["round"], {})[s["step"]] = s
    for r, s in sorted(by_round.items()):
        a, b, u = s["load A"], s["switch to B"], s["unload"]
        lines.append(f"| {r} | {a['seconds']:.1f} s | {b['seconds']:.1f} s ({b['highest_free_during_gib']:.2f} GiB, "
                     f"{'ok' if b['returned'] else 'NOT returned'}) | {u['seconds']:.1f} s ({u['free_gib']:.2f} GiB, "
                     f"{'ok' if u['returned'] else 'NOT returned'}) | {a['tok_s']}, {b['tok_s']} |")
    lines.append("")
    lines.append("failures: " + ("; ".join(report["failures"]) if report["failures"] else "none"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_scenario")
    p.add_argument("--model-a", required=True)
    p.add_argument("--model-b", required=True)
    p.add_argument("--engine-args", default="{}")
    p.add_argument("--engine-args-b", default="{}", help="more engine arguments for model B (dummy weights)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--label", default="GPU scenario")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    report = scenario(args.model_a, args.model_b, json.loads(args.engine_args), args.rounds, args.tokens,
                      json.loads(args.engine_args_b))
    report["markdown"] = to_markdown(report, args.label)
    print(report["markdown"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
