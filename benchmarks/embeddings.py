"""Embeddings per second through the session against raw vLLM's ``LLM.embed`` on the same engine,
paired per round.

``python -m benchmarks.embeddings [--rounds 5] [--texts 256] [--model DIR] [--json PATH]`` loads the
embedder (the demo model pooled into embeddings by default) in this process and measures, each round,
both sides in turn (which goes first alternates):

* **batch**: ``session.embed(texts)`` for ``--texts`` distinct sentences, against ``LLM.embed`` of the
  same texts with the same arguments (truncation to the context) on the same engine, timed on the
  engine's driver thread around vLLM's call alone (``session.run_on_embedder``);
* **one text**: 16 calls of ``session.embed(text)`` against 16 of ``LLM.embed([text])``: the latency of
  a query, where the session's own costs (the hop to the driver thread, the floats) weigh most.

The session's side is timed from the caller, so it pays for everything a user waits for. Ratios are
medians of the per-round ratios (session / raw vLLM; 1.0: no cost).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .rounds import median_ratio, medians_of, note_round, print_tables, results, write_json
from .run import make_prompts

SINGLE_CALLS = 16


def _raw(session: Any, texts: list[str]) -> tuple[float, int]:
    """Seconds that raw vLLM's ``LLM.embed`` takes for ``texts`` (timed on the driver thread), and how many
    vectors it gave."""
    from vllm_magic.engine.compat import TRUNCATE_TO_CONTEXT

    def timed(llm: Any) -> tuple[float, int]:
        t0 = time.perf_counter()
        outputs = llm.embed(texts, use_tqdm=False, tokenization_kwargs=dict(TRUNCATE_TO_CONTEXT))
        return time.perf_counter() - t0, len(outputs)

    return session.run_on_embedder(timed)


def _session(session: Any, texts: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    vectors = session.embed(texts)
    return time.perf_counter() - t0, len(vectors)


def batch_round(session: Any, texts: list[str], raw_first: bool) -> dict[str, float]:
    """Embeddings per second of one batch, both ways."""
    sides: list[tuple[str, Callable[[Any, list[str]], tuple[float, int]]]] = [("raw", _raw), ("session", _session)]
    row: dict[str, float] = {}
    for name, measure in sides if raw_first else sides[::-1]:
        seconds, count = measure(session, texts)
        if count != len(texts):
            raise RuntimeError(f"{name} embedded {count} of {len(texts)} texts")
        row[f"{name}_per_s"] = len(texts) / seconds
    return row


def single_round(session: Any, texts: list[str], raw_first: bool) -> dict[str, float]:
    """Median milliseconds of one text's embedding, both ways."""
    row: dict[str, float] = {}
    sides = [("raw", _raw), ("session", _session)]
    for name, measure in sides if raw_first else sides[::-1]:
        row[f"{name}_ms"] = statistics.median(measure(session, [text])[0] * 1000 for text in texts)
    return row


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure; returns the rounds, their medians and the paired ratios (and writes them with ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.embeddings", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--texts", type=int, default=256, help="texts in the batch (default 256)")
    parser.add_argument("--model", default=None, help="embedding model to load (default: the demo model)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rounds and ratios here")
    args = parser.parse_args(argv)

    from vllm_magic import get_session

    session = get_session()
    info = session.load_embedder(args.model)  # the live embedder when it serves this request
    print(info.summary, file=sys.stderr)
    texts = make_prompts(args.texts)
    singles = texts[:SINGLE_CALLS]
    session.embed(texts[:8])  # the first call pays for warming up
    rounds: dict[str, list[dict[str, float]]] = {"batch": [], "single": []}
    for number in range(args.rounds):
        raw_first = number % 2 == 0
        rounds["batch"].append(batch_round(session, texts, raw_first))
        rounds["single"].append(single_round(session, singles, raw_first))
        note_round(f"round {number + 1}", {**rounds["batch"][-1], **rounds["single"][-1]})
    ratios = {
        "batch: session / raw embeddings per second": median_ratio(rounds["batch"], "session_per_s", "raw_per_s"),
        "one text: session / raw time": median_ratio(rounds["single"], "session_ms", "raw_ms"),
    }
    medians = medians_of(rounds)
    embedder = session.embedder
    data = results(embedder.config.model, embedder.config.platform,
                   embedder.backend.vllm_version if embedder.backend is not None else "n/a", rounds, ratios, medians,
                   dtype=embedder.dtype, dimension=embedder.dimension, texts=args.texts, single_calls=SINGLE_CALLS)
    print_tables(f"{embedder.config.short_name} on {embedder.config.platform} ({embedder.dtype}), {args.texts} texts, "
                 f"{args.rounds} rounds", ratios, medians)
    write_json(args.json, data)
    return data


def main() -> None:
    run()
    from vllm_magic import get_session

    get_session().unload()


if __name__ == "__main__":
    main()
