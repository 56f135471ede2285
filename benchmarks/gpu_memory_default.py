"""What a GPU engine sized for a shared card costs: the batch with vllm-magic's default against vLLM's
``gpu_memory_utilization`` 0.92, in one run, paired per round.

    python -m benchmarks.gpu_memory_default --model DIR [--engine-args JSON] [--rounds 2]
        [--prompts 256] [--tokens 128] [--json PATH]

Each round loads the model twice (the default, then ``gpu_memory_utilization=0.92``), runs one warm-up
batch and then the timed batch (``--prompts`` prompts x ``--tokens`` output tokens, greedy,
``ignore_eos``) through ``session.submit``, and reads the engine's GPU memory (NVML) and KV cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

GiB = float(1 << 30)


def one(session: Any, model: str, engine_args: dict[str, Any], prompts: list[str], tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    session.load(model, **engine_args)
    load = time.perf_counter() - t0
    status = session.status()
    for handle in session.submit(prompts, temperature=0.0, max_tokens=tokens, ignore_eos=True):  # warm-up
        handle.result()
    t0 = time.perf_counter()
    handles = session.submit(prompts, temperature=0.0, max_tokens=tokens, ignore_eos=True)
    out = sum(len(h.result().token_ids) for h in handles)
    seconds = time.perf_counter() - t0
    memory = session.status().memory_bytes
    session.unload()
    return {"load_s": round(load, 1), "tok_s": round(out / seconds, 1), "kv_cache_tokens": status.kv_cache_tokens,
            "engine_gib": None if memory is None else round(memory / GiB, 2), "gpu": status.gpu}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_memory_default")
    p.add_argument("--model", required=True)
    p.add_argument("--engine-args", default="{}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--json")
    args = p.parse_args(argv)

    from benchmarks.run import make_prompts
    from vllm_magic.engine.session import EngineSession

    engine_args = json.loads(args.engine_args)
    prompts = make_prompts(args.prompts)
    session = EngineSession()
    rows = []
    for round_ in range(1, args.rounds + 1):
        default = one(session, args.model, engine_args, prompts, args.tokens)
        vllm = one(session, args.model, {**engine_args, "gpu_memory_utilization": 0.92}, prompts, args.tokens)
        rows.append({"round": round_, "default": default, "vllm_0.92": vllm,
                     "ratio": round(default["tok_s"] / vllm["tok_s"], 3)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.prompts} prompts x {args.tokens} tokens, {args.model}\n")
    print("| round | default: tok/s | KV cache tokens | engine GPU memory | 0.92: tok/s | KV cache tokens "
          "| engine GPU memory | default / 0.92 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        d, v = r["default"], r["vllm_0.92"]
        print(f"| {r['round']} | {d['tok_s']:,.0f} | {d['kv_cache_tokens']:,} | {d['engine_gib']} GiB | "
              f"{v['tok_s']:,.0f} | {v['kv_cache_tokens']:,} | {v['engine_gib']} GiB | {r['ratio']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "engine_args": engine_args, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
