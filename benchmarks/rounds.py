"""Paired rounds, as the feature benchmarks (adapters, embeddings, look_inside) report them.

Each benchmark measures a few rounds; every round times the thing and its baseline back to back, so a
ratio is taken within a round (the machine's load is shared by both) and the median of those ratios
is what the tables say. This module holds the arithmetic, the two markdown tables they print and the
JSON they write with ``--json``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

Rounds = dict[str, list[dict[str, float]]]


def median_ratio(rows: list[dict[str, float]], top: str, bottom: str) -> float:
    """The median over rounds of ``row[top] / row[bottom]`` (each ratio from one round)."""
    return statistics.median(row[top] / row[bottom] for row in rows)


def medians_of(rounds: Rounds) -> dict[str, dict[str, float]]:
    """Each measured value's median over its rounds, per group."""
    return {name: {key: statistics.median(row[key] for row in rows) for key in rows[0]}
            for name, rows in rounds.items() if rows}


def note_round(label: str, row: dict[str, float]) -> None:
    """One round's values on stderr, while the benchmark runs."""
    print(f"{label}: " + ", ".join(f"{key} {value:.1f}" for key, value in row.items()), file=sys.stderr)


def print_tables(heading: str, ratios: dict[str, float], medians: dict[str, dict[str, float]]) -> None:
    """The heading line, the ratios table and the medians table, in markdown."""
    print(f"\n{heading}")
    print("| ratio (median of per-round ratios) | value |\n|---|---|")
    for name, value in ratios.items():
        print(f"| {name} | {value:.3f} |")
    print("\n| medians | |\n|---|---|")
    for name, values in medians.items():
        for key, value in values.items():
            print(f"| {name}: {key} | {value:.1f} |")


def results(model: str, platform: str, vllm: str, rounds: Rounds, ratios: dict[str, float],
            medians: dict[str, dict[str, float]], **extra: Any) -> dict[str, Any]:
    """What ``--json`` writes: the run's model, platform, vLLM and time, the rounds, ratios and medians."""
    return {"model": model, "platform": platform, "vllm": vllm, **extra, "when": time.strftime("%Y-%m-%d %H:%M"),
            "rounds": rounds, "ratios": ratios, "medians": medians}


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2))
