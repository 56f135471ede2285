"""Write a benchmark's results: JSON (everything), a markdown table, and a PNG chart.

    python -m benchmarks.report RESULTS.json [...]   # re-draw tables and charts from saved JSON
    python -m benchmarks.report --doc docs/benchmarks.md   # put the saved tables into the doc

In the doc, ``<!-- results: TAG -->`` ... ``<!-- /results -->`` holds the table of
``benchmarks/results/TAG.json`` (for the session check, the table stored in it).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

__all__ = ["write_all", "markdown_table", "write_chart", "fill_doc", "method_notes"]

GROUP_TITLES = {
    "batch": "batch throughput",
    "ttft": "time to first text",
    "decode": "decode, single stream",
    "load": "load",
    "memory": "engine memory",
    "served batch": "batch throughput, served",
    "served ttft": "time to first text, served",
    "served decode": "decode, single stream, served",
}


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "tok/s":
        return f"{value:,.0f} tok/s" if value >= 100 else f"{value:,.1f} tok/s"
    if unit == "ms":
        return f"{value:,.2f} ms" if value < 100 else f"{value:,.0f} ms"
    if unit == "s":
        return f"{value:,.1f} s"
    if unit == "GiB":
        return f"{value:,.2f} GiB"
    return f"{value:g} {unit}"


def _ratio(row: dict) -> str:
    if row.get("ratio") is None:
        return ""
    if row["group"].endswith("ttft"):
        return f"{row['ratio']:+.2f} ms"
    return f"{row['ratio']:.3f}"


def header_line(meta: dict) -> str:
    parts = [
        f"**device**: {meta['device']}", f"**vLLM** {meta['vllm_version']}", f"**model**: {meta['model_label']}",
        f"dtype {meta.get('dtype')}",
        f"{meta['prompts']} prompts x {meta['tokens']} output tokens (ignore_eos, temperature 0)",
        f"single stream: {meta['stream_tokens']} tokens",
        f"{meta.get('statistic', 'best')} of {meta['repeats']} (batch) / {meta['stream_repeats']} (decode) / "
        f"{meta.get('ttft_repeats', meta['stream_repeats'])} (first text) interleaved runs",
        meta["date"],
    ]
    return " · ".join(parts)


def method_notes(meta: dict) -> list[str]:
    """How the comparison with raw vLLM was taken; results that predate paired runs say so."""
    if meta.get("pairing"):
        return [f"vs. raw vLLM: the {meta['pairing']} (time to first text: of per-run differences, in ms); "
                "in every run each row generated as many tokens as raw vLLM, or it is marked failed. "
                f"vLLM's prefix cache was {meta.get('prefix_cache', 'not reset')}."]
    return ["Taken before paired runs: vs. raw vLLM compares the rows' summary values, every run sent the "
            "same prompts without emptying vLLM's prefix cache, and token counts were not checked."]


def markdown_table(results: dict) -> str:
    """The results as a markdown table; raises ValueError if a row was measured in another run."""
    meta = results["meta"]
    strays = [r["name"] for r in results["rows"] if r.get("run_id", meta.get("run_id")) != meta.get("run_id")]
    if strays:
        raise ValueError(f"rows from another run than {meta.get('run_id')}: {strays}")
    lines = [f"#### {meta['title']}", "", header_line(meta), "",
             f"Engine arguments: `{json.dumps(meta['engine_kwargs'], sort_keys=True)}`", "",
             "| measure | front-end / action | result | vs. raw vLLM | target | met |",
             "|---|---|---|---|---|---|"]
    for row in results["rows"]:
        met = "" if row.get("met") is None else ("yes" if row["met"] else "**no**")
        if row.get("failed"):
            met = "**failed**"
        result = _fmt(row["value"], row["unit"]) if row.get("available", True) else "not available"
        note = f" ({row['note']})" if row.get("note") else ""
        lines.append(f"| {GROUP_TITLES.get(row['group'], row['group'])} | {row['name']}{note} | {result} | "
                     f"{_ratio(row)} | {row.get('target') or ''} | {met} |")
    notes = [*meta.get("notes", []), *method_notes(meta)]
    if meta.get("complete") is False:
        notes.append("This run was cut short: what it had not measured yet is missing.")
    lines.append("")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_chart(results: dict, path: Path) -> Path | None:
    """A 2x2 PNG: throughput and decode ratios, time to first text, load times. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in results["rows"] if r.get("available", True) and r.get("value") is not None
            and not (isinstance(r["value"], float) and math.isnan(r["value"]))]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))

    def bars(ax, group, key, title, target=None, log=False, xlabel=""):
        chosen = [r for r in rows if r["group"] == group and (key != "ratio" or r.get("ratio") is not None)]
        names = [r["name"] for r in chosen][::-1]
        values = [(r["ratio"] if key == "ratio" else r["value"]) for r in chosen][::-1]
        if not chosen:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.barh(names, values, color="#4c72b0")
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
        if target is not None:
            ax.axvline(target, color="#c44e52", linestyle="--", linewidth=1, label=f"target {target}")
            ax.legend(loc="lower right", fontsize=8)
        if log:
            ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=8)

    bars(axes[0, 0], "batch", "ratio", "batch throughput / raw LLM.generate", target=0.98, xlabel="ratio")
    bars(axes[0, 1], "decode", "ratio", "single-stream decode / raw engine step loop", target=0.97,
         xlabel="ratio")
    bars(axes[1, 0], "ttft", "value", "time to first text (ms)", xlabel="ms")
    load_rows = [r for r in rows if r["group"] == "load"]
    ax = axes[1, 1]
    names = [r["name"] for r in load_rows][::-1]
    seconds = [r["value"] / 1e3 if r["unit"] == "ms" else r["value"] for r in load_rows][::-1]
    ax.barh(names, seconds, color="#55a868")
    for y, v in enumerate(seconds):
        ax.text(v, y, f" {v:.3g} s", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_title("load / reload / switch (seconds, log scale)", fontsize=10)
    ax.tick_params(labelsize=8)
    meta = results["meta"]
    fig.suptitle(f"{meta['title']} — {meta['device']}, vLLM {meta['vllm_version']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results: dict, out_dir: Path, tag: str, chart: bool = True) -> dict[str, Path]:
    """Write ``tag.json``, ``tag.md`` and (with matplotlib) ``tag.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{tag}.json", "md": out_dir / f"{tag}.md"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str))
    paths["md"].write_text(markdown_table(results))
    if chart:
        png = write_chart(results, out_dir / f"{tag}.png")
        if png is not None:
            paths["png"] = png
    return paths


def fill_doc(doc: Path, results_dir: Path) -> None:
    """Replace every results block of ``doc`` with the table of the results JSON it names.

    Each table is drawn from its one JSON file, never from an edited ``.md``: a table shows one
    run's rows only (``markdown_table`` refuses rows of another run).
    """
    text = doc.read_text()

    def table(match: re.Match) -> str:
        tag = match.group(1)
        path = results_dir / f"{tag}.json"
        if not path.exists():
            return match.group(0)  # not measured yet: leave the block as it is
        data = json.loads(path.read_text())
        body = markdown_table(data) if "rows" in data else data["markdown"]  # the session check: its own table
        return f"<!-- results: {tag} -->\n\n{body.strip()}\n\n<!-- /results -->"

    pattern = re.compile(r"<!-- results: ([\w.-]+) -->(?:.*?<!-- /results -->)?", re.S)
    doc.write_text(pattern.sub(table, text))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--doc"]:
        fill_doc(Path(sys.argv[2]), Path(__file__).parent / "results")
        sys.exit(0)
    for name in sys.argv[1:]:
        source = Path(name)
        data = json.loads(source.read_text())
        for kind, path in write_all(data, source.parent, source.stem).items():
            print(kind, path)
