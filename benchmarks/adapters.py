"""What a LoRA adapter costs decoding, paired per round, and what --enable-lora costs the base model.

``python -m benchmarks.adapters [--rounds 3] [--json PATH]`` loads the demo model with
``--enable-lora``, registers the demo adapter (``python -m vllm_magic demo-lora``) and measures, each
round, in turn:

* **one stream**: the decode rate of 128 greedy tokens (``ignore_eos``) of the base model, then of
  the adapter, on the same engine;
* **a batch**: 8 such requests at once, base then adapter (output tokens per second of the batch);
* **mixed**: 4 of the prompts without and with the adapter, in one submission (a grid).

Then it loads the demo model without ``--enable-lora`` and measures the base model's one stream and
batch the same number of rounds: what enabling LoRA costs requests that use no adapter (these two
engines run one after the other, so that ratio is of medians, not paired). Ratios are medians of the
per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

PROMPTS = ["Tell me a long story about the sea.", "Describe a walk through a forest.", "Explain how ships float.",
           "Write about a day at the market.", "Tell me about the mountains.", "Describe a storm at night.",
           "Explain why bread rises.", "Tell me a story about a lighthouse."]
TOKENS = 128


def _stream(session: Any, lora: str | None) -> float:
    return session.generate(PROMPTS[0], temperature=0, max_tokens=TOKENS, ignore_eos=True, lora=lora).tokens_per_second


def _batch(session: Any, lora: str | None) -> float:
    start = time.perf_counter()
    handles = session.submit(PROMPTS, temperature=0, max_tokens=TOKENS, ignore_eos=True, lora=lora)
    tokens = sum(h.result(timeout=1800).output_tokens for h in handles)
    return tokens / (time.perf_counter() - start)


def _mixed(session: Any, lora: str) -> float:
    start = time.perf_counter()  # one submission: 4 prompts without the adapter and the same 4 with it
    grid = session.grid(PROMPTS[:4], {"lora": ["base", lora]}, temperature=0, max_tokens=TOKENS, ignore_eos=True)
    tokens = sum(r.output_tokens for row in grid.results() for r in row)
    return tokens / (time.perf_counter() - start)


def lora_round(session: Any, name: str) -> dict[str, float]:
    return {"base_stream_tok_s": _stream(session, None), "adapter_stream_tok_s": _stream(session, name),
            "base_batch8_tok_s": _batch(session, None), "adapter_batch8_tok_s": _batch(session, name),
            "mixed_batch8_tok_s": _mixed(session, name)}


def plain_round(session: Any) -> dict[str, float]:
    return {"base_stream_tok_s": _stream(session, None), "base_batch8_tok_s": _batch(session, None)}


def _median_ratio(rounds: list[dict[str, float]], top: str, bottom: str) -> float:
    return statistics.median(r[top] / r[bottom] for r in rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the rounds and ratios here")
    args = parser.parse_args()

    from vllm_magic import get_session
    from vllm_magic.demo.lora import DEMO_LORA_NAME, prepare_demo_lora

    adapter = prepare_demo_lora(quiet=True)
    session = get_session()
    print(session.load(enable_lora=True).summary, file=sys.stderr)
    session.add_lora(DEMO_LORA_NAME, adapter)
    session.generate("Warm up.", max_tokens=8)
    session.generate("Warm up.", max_tokens=8, lora=DEMO_LORA_NAME)
    status = session.status()
    rounds: dict[str, list[dict[str, float]]] = {"lora_engine": [], "plain_engine": []}
    for number in range(1, args.rounds + 1):
        row = lora_round(session, DEMO_LORA_NAME)
        rounds["lora_engine"].append(row)
        print(f"round {number} lora engine: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), file=sys.stderr)
    session.unload()
    print(session.load().summary, file=sys.stderr)
    session.generate("Warm up.", max_tokens=8)
    for number in range(1, args.rounds + 1):
        row = plain_round(session)
        rounds["plain_engine"].append(row)
        print(f"round {number} plain engine: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), file=sys.stderr)
    session.unload()
    lora_rows = rounds["lora_engine"]
    medians = {name: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for name, rows in rounds.items()}
    ratios = {
        "adapter / base, one stream (same engine)": _median_ratio(lora_rows, "adapter_stream_tok_s", "base_stream_tok_s"),
        "adapter / base, batch of 8 (same engine)": _median_ratio(lora_rows, "adapter_batch8_tok_s", "base_batch8_tok_s"),
        "mixed 4+4 / base, batch of 8 (same engine)": _median_ratio(lora_rows, "mixed_batch8_tok_s",
                                                                    "base_batch8_tok_s"),
        "base on a LoRA engine / on a plain engine, one stream (medians)":
            medians["lora_engine"]["base_stream_tok_s"] / medians["plain_engine"]["base_stream_tok_s"],
        "base on a LoRA engine / on a plain engine, batch of 8 (medians)":
            medians["lora_engine"]["base_batch8_tok_s"] / medians["plain_engine"]["base_batch8_tok_s"],
    }
    print(f"\n{status.model} on {status.platform} ({status.dtype}), vLLM {status.vllm_version}, {args.rounds} rounds")
    print("| ratio | value |\n|---|---|")
    for name, value in ratios.items():
        print(f"| {name} | {value:.3f} |")
    print("\n| medians (tokens per second) | |\n|---|---|")
    for name, values in medians.items():
        for key, value in values.items():
            print(f"| {name}: {key} | {value:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"model": status.model, "platform": status.platform,
                                         "vllm": status.vllm_version, "when": time.strftime("%Y-%m-%d %H:%M"),
                                         "rounds": rounds, "ratios": ratios, "medians": medians}, indent=2))


if __name__ == "__main__":
    main()
