"""Tensor parallel and AWQ on one machine: ``python -m benchmarks.scaling [--runs N] [--tag TAG]``.

For each configuration (the demo model; its tensor-parallel variant under TP 1 and TP 2; its AWQ
checkpoint) one engine is loaded through the session, and then, ``--runs`` times, a batch of greedy
prompts is timed through ``session.submit`` and through raw vLLM's ``LLM.generate`` on the same
engine, alternating, with vLLM's prefix cache emptied before each (paired per run: the ratio is the
median of the per-run ratios). Each row: load time, batch tok/s of both, their ratio, and the RSS of
the engine processes after the batches. Writes ``benchmarks/results/TAG.json`` and ``TAG.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.frontends import fresh_prefix_cache
from benchmarks.measure import engine_memory_now, machine_description

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [f"Write a short story about a {animal} who learns to {skill}." for animal, skill in
           [("cat", "cook"), ("dog", "sing"), ("fox", "paint"), ("owl", "swim"), ("bear", "dance"),
            ("frog", "fly"), ("wolf", "read"), ("hare", "knit")]] * 2


def _configurations() -> list[tuple[str, str | None, dict]]:
    from vllm_magic.demo.variants import prepare_awq_demo_model, prepare_tiny_model

    tiny, awq = str(prepare_tiny_model(quiet=True)), str(prepare_awq_demo_model(quiet=True))
    return [("demo model", None, {}), ("tiny model, TP 1", tiny, {"tensor_parallel_size": 1}),
            ("tiny model, TP 2", tiny, {"tensor_parallel_size": 2}), ("AWQ demo model", awq, {"quantization": "awq"})]


def _raw_batch(session, tokens: int) -> tuple[float, int]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)

    def work(llm):
        fresh_prefix_cache(llm)
        texts = [session.render_prompt(p) for p in PROMPTS]
        start = time.perf_counter()
        outputs = llm.generate(texts, params, use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)

    return session.run_on_engine(work)


def _session_batch(session, tokens: int) -> tuple[float, int]:
    session.run_on_engine(fresh_prefix_cache)
    start = time.perf_counter()
    handles = session.submit(PROMPTS, temperature=0.0, max_tokens=tokens, ignore_eos=True)
    results = [h.result() for h in handles]
    return time.perf_counter() - start, sum(r.output_tokens for r in results)


def measure(runs: int, tokens: int) -> list[dict]:
    from vllm_magic.engine.session import EngineSession

    rows = []
    for name, model, kwargs in _configurations():
        session = EngineSession()
        info = session.load(model, **kwargs)
        raw, ours, ratios = [], [], []
        for _ in range(runs):
            seconds, count = _raw_batch(session, tokens)
            raw.append(count / seconds)
            seconds, count = _session_batch(session, tokens)
            ours.append(count / seconds)
            ratios.append(ours[-1] / raw[-1])
        memory, kind = engine_memory_now(session.config.platform)
        rows.append({"name": name, "summary": info.summary, "load_s": round(info.seconds, 1),
                     "raw_tok_s": [round(v, 1) for v in raw], "session_tok_s": [round(v, 1) for v in ours],
                     "ratio": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios],
                     "memory_gib": round(memory / 2**30, 2) if memory else None, "memory_kind": kind})
        session.unload()
        print(json.dumps(rows[-1]), flush=True)
    return rows


# Recorded with the results: report.py treats result files without it as taken before paired runs.
PAIRING = "median of per-run ratios; each run measures raw vLLM and session.submit back to back"


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"{meta['machine']}, vLLM {meta['vllm']}; {meta['prompts']} prompts x {meta['tokens']} tokens, "
             f"greedy, {meta['runs']} paired runs; `{meta['command']}`", "",
             "| configuration | load | raw vLLM batch | `session.submit` batch | ratio (median of runs) | RSS of engine processes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['load_s']:.1f} s | {max(r['raw_tok_s']):.0f} tok/s | "
                     f"{max(r['session_tok_s']):.0f} tok/s | {r['ratio']:.2f} | {r['memory_gib']:.2f} GiB |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--tag", default="cpu-scaling")
    args = parser.parse_args(argv)
    from vllm_magic.engine.compat import vllm_version

    rows = measure(args.runs, args.tokens)
    meta = {"machine": machine_description(), "vllm": vllm_version(), "prompts": len(PROMPTS), "tokens": args.tokens,
            "runs": args.runs, "pairing": PAIRING,
            "command": f"python -m benchmarks.scaling --runs {args.runs} --tokens {args.tokens}"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = to_markdown(rows, meta)
    (RESULTS / f"{args.tag}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
