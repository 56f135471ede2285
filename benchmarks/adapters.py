"""What a LoRA adapter costs decoding, paired per round, and what --enable-lora costs the base model.

``python -m benchmarks.adapters [--rounds 3] [--json PATH]`` loads the demo model with
``--enable-lora``, registers the demo adapter (``python -m vllm_magic demo-lora``) and measures, each
round, in turn:

* **one stream**: the decode rate of 128 greedy tokens (``ignore_eos``) of the base model, then of
  the adapter, on the same engine;
* **a batch**: 8 such requests at once, base then adapter (output tokens per second of the batch);
* **mixed**: 4 of the prompts without and with the adapter, in one submission (a grid);
* **raw vLLM**: the batch of 8 through ``LLM.generate`` on the same engine (the prompts after the chat
  template, the adapter's own ``LoRARequest``), base then adapter: the floor for the session's batch.

Then it loads the demo model without ``--enable-lora`` and measures the base model's one stream and
batch the same number of rounds: what enabling LoRA costs requests that use no adapter (these two
engines run one after the other, so that ratio is of medians, not paired). Ratios are medians of the
per-round ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .rounds import median_ratio, medians_of, note_round, print_tables, results, write_json

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


def _raw_batch(session: Any, adapter: Any) -> float:
    """The batch through raw ``LLM.generate`` on the session's engine, with the adapter (or none)."""
    from vllm import SamplingParams

    texts = [session.render_prompt(p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
    lora = session.backend.lora_request(None if adapter is None else adapter.name)  # the request's own LoRARequest

    def work(llm: Any) -> float:
        start = time.perf_counter()
        outputs = llm.generate(texts, params, lora_request=lora, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)

    return session.run_on_engine(work)


def lora_round(session: Any, adapter: Any) -> dict[str, float]:
    name = adapter.name
    return {"base_stream_tok_s": _stream(session, None), "adapter_stream_tok_s": _stream(session, name),
            "base_batch8_tok_s": _batch(session, None), "adapter_batch8_tok_s": _batch(session, name),
            "mixed_batch8_tok_s": _mixed(session, name),
            "raw_base_batch8_tok_s": _raw_batch(session, None), "raw_adapter_batch8_tok_s": _raw_batch(session, adapter)}


def plain_round(session: Any) -> dict[str, float]:
    return {"base_stream_tok_s": _stream(session, None), "base_batch8_tok_s": _batch(session, None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the rounds and ratios here")
    args = parser.parse_args()

    from vllm_magic import get_session
    from vllm_magic.demo.lora import DEMO_LORA_NAME, prepare_demo_lora

    path = prepare_demo_lora(quiet=True)
    session = get_session()
    print(session.load(enable_lora=True).summary, file=sys.stderr)
    adapter = session.add_lora(DEMO_LORA_NAME, path)
    session.generate("Warm up.", max_tokens=8)
    session.generate("Warm up.", max_tokens=8, lora=DEMO_LORA_NAME)
    status = session.status()
    rounds: dict[str, list[dict[str, float]]] = {"lora_engine": [], "plain_engine": []}
    for number in range(1, args.rounds + 1):
        rounds["lora_engine"].append(lora_round(session, adapter))
        note_round(f"round {number} lora engine", rounds["lora_engine"][-1])
    session.unload()
    print(session.load().summary, file=sys.stderr)
    session.generate("Warm up.", max_tokens=8)
    for number in range(1, args.rounds + 1):
        rounds["plain_engine"].append(plain_round(session))
        note_round(f"round {number} plain engine", rounds["plain_engine"][-1])
    session.unload()
    lora_rows = rounds["lora_engine"]
    medians = medians_of(rounds)
    ratios = {
        "adapter / base, one stream (same engine)": median_ratio(lora_rows, "adapter_stream_tok_s", "base_stream_tok_s"),
        "adapter / base, batch of 8 (same engine)": median_ratio(lora_rows, "adapter_batch8_tok_s", "base_batch8_tok_s"),
        "mixed 4+4 / base, batch of 8 (same engine)": median_ratio(lora_rows, "mixed_batch8_tok_s", "base_batch8_tok_s"),
        "session / raw vLLM, adapter batch of 8": median_ratio(lora_rows, "adapter_batch8_tok_s",
                                                               "raw_adapter_batch8_tok_s"),
        "session / raw vLLM, base batch of 8 (LoRA engine)": median_ratio(lora_rows, "base_batch8_tok_s",
                                                                          "raw_base_batch8_tok_s"),
        "base on a LoRA engine / on a plain engine, one stream (medians)":
            medians["lora_engine"]["base_stream_tok_s"] / medians["plain_engine"]["base_stream_tok_s"],
        "base on a LoRA engine / on a plain engine, batch of 8 (medians)":
            medians["lora_engine"]["base_batch8_tok_s"] / medians["plain_engine"]["base_batch8_tok_s"],
    }
    print_tables(f"{status.model} on {status.platform} ({status.dtype}), vLLM {status.vllm_version}, "
                 f"{args.rounds} rounds (medians in output tokens per second)", ratios, medians)
    write_json(args.json, results(status.model, status.platform, status.vllm_version, rounds, ratios, medians))


if __name__ == "__main__":
    main()
