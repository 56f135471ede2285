"""Sleep mode in figures, through the session (what %vllm_sleep, %vllm_wake and --keep do).

    python -m benchmarks.gpu_sleep --model DIR --other DIR [--engine-args JSON] [--json PATH]
        [--no-cost]

On ``--model`` (e.g. the Llama-3-8B shape with dummy weights): load with sleep mode (the session's
GPU default), greedy token ids, single-stream decode speed; level-1 sleep (seconds, device memory
freed, host RAM of the engine processes) and wake (seconds, same greedy ids); switching to
``--other`` with ``keep=True`` and back (a wake) against a full reload of the same model after
an unload. Unless ``--no-cost``, the model is loaded once more without sleep mode, to compare load
time and decode speed (the cost of sleep mode).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

GiB = float(1 << 30)
PROMPT = "Write a haiku about the sea."


def used_gib() -> float:
    from vllm_magic.engine.backends.local import device_memory_used

    return device_memory_used("cuda") / GiB


def ids(session: Any) -> list[int]:
    return session.generate(PROMPT, temperature=0, max_tokens=32, ignore_eos=True).token_ids


def decode_tok_s(session: Any) -> float:
    result = session.generate(PROMPT, temperature=0, max_tokens=256, ignore_eos=True)
    return round(result.tokens_per_second, 1)


def run(model: str, other: str, engine_kwargs: dict, cost: bool) -> dict[str, Any]:
    import psutil

    from vllm_magic import get_session

    session = get_session()
    out: dict[str, Any] = {"model": model, "engine_kwargs": engine_kwargs}

    def note(key: str, value: Any) -> None:
        out[key] = value
        print(json.dumps({key: value}), flush=True)

    note("used_before_load_gib", round(used_gib(), 2))
    t0 = time.perf_counter()
    session.load(model, **engine_kwargs)
    note("load_s (sleep mode on)", round(time.perf_counter() - t0, 1))
    note("used_awake_gib", round(used_gib(), 2))
    reference = ids(session)
    note("decode_tok_s (sleep mode on)", decode_tok_s(session))

    host_before = psutil.virtual_memory().used / GiB
    report = session.sleep(1)
    note("sleep_1_s", round(report.seconds, 2))
    note("sleep_1_freed_gib", round(report.freed_bytes / GiB, 2))
    note("used_asleep_1_gib", round(used_gib(), 2))
    note("host_ram_grew_gib", round(psutil.virtual_memory().used / GiB - host_before, 2))
    note("wake_1_s", round(session.wake(), 2))
    note("same_greedy_ids_after_wake_1", ids(session) == reference)

    t0 = time.perf_counter()
    info = session.load(other, keep=True, **engine_kwargs)
    note("switch_to_other_with_keep_s", round(time.perf_counter() - t0, 1))
    note("switch_kept_line", info.kept)
    t0 = time.perf_counter()
    info = session.load(model, keep=True, **engine_kwargs)
    note("switch_back_s (wake)", round(time.perf_counter() - t0, 2))
    note("switch_back_woken", info.woken)
    note("same_greedy_ids_after_switch_back", ids(session) == reference)

    session.unload()
    note("used_after_unload_all_gib", round(used_gib(), 2))
    t0 = time.perf_counter()
    session.load(model, **engine_kwargs)
    note("full_reload_s", round(time.perf_counter() - t0, 1))
    note("same_greedy_ids_after_reload", ids(session) == reference)
    if cost:
        session.unload()
        t0 = time.perf_counter()
        session.load(model, **{**engine_kwargs, "enable_sleep_mode": False})
        note("load_s (sleep mode off)", round(time.perf_counter() - t0, 1))
        note("decode_tok_s (sleep mode off)", decode_tok_s(session))
        note("same_greedy_ids_without_sleep_mode", ids(session) == reference)
    session.unload()
    note("used_after_unload_gib", round(used_gib(), 2))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_sleep")
    p.add_argument("--model", required=True)
    p.add_argument("--other", required=True)
    p.add_argument("--engine-args", default="{}")
    p.add_argument("--no-cost", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    report = run(args.model, args.other, json.loads(args.engine_args), not args.no_cost)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
