"""A persisted engine on a GPU: ``python -m benchmarks.gpu_persist_check [--model M] [--engine-args JSON]``.

Starts a persisted engine (``session.load(..., persist=True)``), answers a greedy question, puts it to
sleep through its server's sleep routes (level 1) and wakes it (same answer), switches to another
engine with ``keep=True`` (the persisted one sleeps) and back (it wakes), detaches and attaches again
(no new process), and ends it with ``unload(stop=True)`` (no process left, GPU memory back). Prints one
JSON object with the times, the memory and the checks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import Any


def used() -> int | None:
    from vllm_magic.engine.backends.local import device_memory_used

    return device_memory_used("cuda")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_persist_check")
    parser.add_argument("--model", default=None)
    parser.add_argument("--engine-args", default='{"enforce_eager": true, "gpu_memory_utilization": 0.4}')
    args = parser.parse_args(argv)
    runtime = tempfile.mkdtemp(prefix="vmrt-")
    os.environ["VLLM_MAGIC_RUNTIME"] = runtime
    from vllm_magic import get_session
    from vllm_magic.engine.backends import persisted

    engine_args = json.loads(args.engine_args)
    session = get_session()
    out: dict[str, Any] = {"memory_before_gib": (used() or 0) / 2**30}
    ask = lambda: session.generate("What is the capital of France?", temperature=0, max_tokens=16).token_ids  # noqa: E731
    try:
        t0 = time.perf_counter()
        info = session.load(args.model, persist=True, **engine_args)
        out["start_s"], out["start_line"] = round(time.perf_counter() - t0, 1), info.summary
        engine = session.backend.persisted
        pids = sorted(p.pid for p in engine.processes())
        out["memory_loaded_gib"] = (used() or 0) / 2**30
        greedy = ask()
        report = session.sleep(1)
        out["sleep_s"], out["sleep_freed_gib"] = round(report.seconds, 2), (report.freed_bytes or 0) / 2**30
        out["wake_s"] = round(session.wake(), 2)
        out["same_after_wake"] = ask() == greedy
        t0 = time.perf_counter()
        # Another engine that the first request's arguments do not accept (its memory share differs),
        # so that loading the first one again must wake the persisted engine.
        other = {**engine_args, "gpu_memory_utilization": round(engine_args.get("gpu_memory_utilization", 0.4) / 2, 2)}
        switched = session.load(args.model, keep=True, **other)
        out["switch_s"], out["switch_kept"] = round(time.perf_counter() - t0, 1), switched.kept
        t0 = time.perf_counter()
        back = session.load(args.model, **engine_args)
        out["switch_back_s"], out["switch_back_line"] = round(time.perf_counter() - t0, 1), back.summary
        out["same_after_switch_back"] = ask() == greedy
        out["switched_back_to_persisted"] = session.backend.persisted is engine
        session.unload()
        t0 = time.perf_counter()
        again = session.load(args.model, persist=True, **engine_args)
        out["attach_s"], out["attach_line"] = round(time.perf_counter() - t0, 2), again.summary
        out["same_processes"] = sorted(p.pid for p in session.backend.persisted.processes()) == pids
        session.unload(stop=True)
        out["processes_left"] = len(engine.processes())
        out["memory_after_stop_gib"] = (used() or 0) / 2**30
    finally:
        session.unload()
        for left in persisted.engines():
            left.stop()
        shutil.rmtree(runtime, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
