"""Run the benchmark: ``python -m benchmarks.run [--size smoke|cpu|gpu] [--model PATH] ...``.

In one process, on one engine, with the same prompts, it measures raw vLLM and each front-end of
vllm-magic (batch throughput, single-stream time to first text and decode rate), then reloads with
the same configuration, switches ``max_model_len`` and back, unloads, and constructs LangChain
community's ``VLLM`` twice as the control; engine memory is sampled all along. Results go to
``benchmarks/results/TAG.{json,md,png}``.

Examples::

    python -m benchmarks.run                       # CPU size, demo model
    python -m benchmarks.run --size smoke --no-switch --no-control
    python -m benchmarks.run --size gpu --model .gpu/run/llama8b-shape \\
        --engine-args '{"load_format": "dummy", "dtype": "bfloat16"}' --tag gpu-llama8b
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform as _platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .frontends import BATCH, STREAM, Workload
from .loads import community_vllm_twice, magic_load_line, reload_magic, reload_session
from .measure import MemorySampler, Row, Sample, best, machine_description, median
from .report import write_all

__all__ = ["main", "run", "SIZES"]

SIZES: dict[str, dict[str, Any]] = {
    # A few seconds of generation: the test suite runs this size.
    "smoke": dict(prompts=4, tokens=8, stream_tokens=8, repeats=1, stream_repeats=1, ttft_repeats=1, reload_repeats=5),
    "cpu": dict(prompts=16, tokens=32, stream_tokens=32, repeats=3, stream_repeats=3, ttft_repeats=10,
                reload_repeats=20),
    "gpu": dict(prompts=256, tokens=128, stream_tokens=128, repeats=5, stream_repeats=5, ttft_repeats=20,
                reload_repeats=20),
}

BATCH_TARGET = 0.98
DECODE_TARGET = 0.97
TTFT_TARGET_MS = 2.0
RELOAD_TARGET_MS = 10.0
STREAMING_FRONTENDS = ("session streaming", "%%vllm streaming", "LangChain llm.stream")

_ANIMALS = ["fox", "otter", "heron", "badger", "whale", "lynx", "sparrow", "tortoise"]
_SKILLS = ["bake bread", "read maps", "play the violin", "build a boat", "grow tomatoes", "paint stars",
           "fix clocks", "sing in a choir"]


def make_prompts(n: int) -> list[str]:
    """``n`` distinct, similar-length prompts (no prefix-cache shortcuts between them)."""
    return [f"Story {i}: write a short story about a {_ANIMALS[i % 8]} who learns to {_SKILLS[(i // 8) % 8]}."
            for i in range(n)]


STREAM_PROMPT = "Explain, step by step, how a rainbow forms."
TTFT_TOKENS = 8  # the time-to-first-text runs stop early: many short runs beat a few long ones
GiB = float(1 << 30)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="workload size (default: gpu on a GPU, else cpu)")
    p.add_argument("--model", default=None, help="model directory or name (default: the demo model)")
    p.add_argument("--model-label", default=None, help="model name for the table header")
    p.add_argument("--engine-args", default="{}", help="vllm.LLM keyword arguments as JSON")
    p.add_argument("--prompts", type=int, help="batch prompts (overrides the size)")
    p.add_argument("--tokens", type=int, help="output tokens per batch prompt")
    p.add_argument("--stream-tokens", type=int, help="output tokens of the single stream")
    p.add_argument("--repeats", type=int, help="runs per batch front-end")
    p.add_argument("--stream-repeats", type=int, help="decode runs per streaming front-end")
    p.add_argument("--ttft-repeats", type=int, help="short time-to-first-text runs per streaming front-end")
    p.add_argument("--reload-repeats", type=int, help="same-configuration reloads to time")
    p.add_argument("--switch-max-model-len", type=int, default=None,
                   help="max_model_len to switch to (default: half the loaded one)")
    p.add_argument("--no-switch", action="store_true", help="skip the switch (and switch back)")
    p.add_argument("--no-switch-back", action="store_true", help="switch once, not back")
    p.add_argument("--no-control", action="store_true", help="skip constructing LangChain community's VLLM twice")
    p.add_argument("--control-drop-first", action="store_true",
                   help="drop the control's first engine before building the second (memory-tight machines)")
    p.add_argument("--title", default=None, help="table title")
    p.add_argument("--tag", default=None, help="file name stem of the results (default: SIZE-MODEL)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results directory")
    p.add_argument("--note", action="append", default=[], help="a note for the table (repeatable)")
    p.add_argument("--statistic", choices=("median", "best"), default="median",
                   help="how runs are summarized: median, or best (max tok/s, min ms) on a busy shared machine")
    p.add_argument("--no-chart", action="store_true")
    return p.parse_args(argv)


def _say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _measure_group(entries, workload: Workload, repeats: int, warm: Workload) -> dict[str, Any]:
    """Warm each front-end up once, then run them interleaved ``repeats`` times."""
    samples: dict[str, list[Sample]] = {}
    problems: dict[str, str] = {}
    live = []
    for name, fn, needs in entries:
        if needs is not None and not needs():
            problems[name] = "front-end not available"
            continue
        try:
            fn(warm)
            live.append((name, fn))
            samples[name] = []
        except Exception as exc:  # a front-end that fails is reported, the others still run
            problems[name] = f"error: {type(exc).__name__}: {exc}"[:300]
            _say(f"{name}: {problems[name]}")
    for rep in range(repeats):
        # Rotate the order each run so that no front-end always runs first (GPU clocks, caches).
        for name, fn in live[rep % len(live):] + live[:rep % len(live)] if live else []:
            try:
                samples[name].append(fn(workload))
            except Exception as exc:
                problems[name] = f"error: {type(exc).__name__}: {exc}"[:300]
                _say(f"{name}: {problems[name]}")
        _say(f"run {rep + 1}/{repeats}: " + ", ".join(
            f"{n} {samples[n][-1].value:,.1f}" for n, _ in live if samples.get(n)))
    return {"samples": samples, "problems": problems}


def _batch_rows(measured: dict, pick: Callable[[list[float], bool], float]) -> list[Row]:
    rows, raw = [], None
    for name, _, _ in BATCH:
        values = [s.value for s in measured["samples"].get(name, [])]
        if not values:
            rows.append(Row("batch", name, "tok/s", available=False, note=measured["problems"].get(name, "")))
            continue
        value = pick(values, True)
        row = Row("batch", name, "tok/s", value, samples=values)
        extras = [s.extra for s in measured["samples"][name] if "head_ms" in s.extra]
        if extras and name != BATCH[0][0]:
            row.note = (f"{median([e['head_ms'] for e in extras]):.0f} ms before the first request, "
                        f"{median([e['tail_ms'] for e in extras]):.0f} ms after the last")
        if raw is None:
            raw = value
        else:
            row.baseline, row.ratio = BATCH[0][0], value / raw
            row.target, row.met = f">= {BATCH_TARGET}", row.ratio >= BATCH_TARGET
        rows.append(row)
    return rows


def _stream_rows(ttft_measured: dict, decode_measured: dict,
                 pick: Callable[[list[float], bool], float]) -> list[Row]:
    """Time to first text from the short runs, decode rate from the long ones."""
    ttft_rows, decode_rows = [], []
    base = STREAM[0][0]
    base_ttft = [s.value for s in ttft_measured["samples"].get(base, [])]
    base_decode = [s.extra["decode"] for s in decode_measured["samples"].get(base, [])
                   if not math.isnan(s.extra["decode"])]
    raw_ttft = pick(base_ttft, False) if base_ttft else None
    raw_decode = pick(base_decode, True) if base_decode else None
    for name, _, _ in STREAM:
        ttft_samples = ttft_measured["samples"].get(name, [])
        decode_samples = decode_measured["samples"].get(name, [])
        if not ttft_samples:
            ttft_rows.append(Row("ttft", name, "ms", available=False, note=ttft_measured["problems"].get(name, "")))
        else:
            values = [s.value for s in ttft_samples]
            row = Row("ttft", name, "ms", pick(values, False), samples=values)
            if name == "raw LLM.generate":
                row.note = "no streaming: a 1-token generate"
            heads = [s.extra["head_ms"] for s in ttft_samples if "head_ms" in s.extra]
            if heads:
                row.note = f"{median(heads):.2f} ms before the request reached the session"
            if name != base and raw_ttft is not None:
                row.baseline, row.ratio = base, row.value - raw_ttft
                if name in STREAMING_FRONTENDS:
                    row.target, row.met = f"<= +{TTFT_TARGET_MS:g} ms", row.ratio <= TTFT_TARGET_MS
            ttft_rows.append(row)
        decodes = [s.extra["decode"] for s in decode_samples if not math.isnan(s.extra["decode"])]
        if not decodes:
            decode_rows.append(Row("decode", name, "tok/s", available=bool(decode_samples),
                                   note=decode_measured["problems"].get(name, "")))
            continue
        row = Row("decode", name, "tok/s", pick(decodes, True), samples=decodes)
        if name == "raw LLM.generate":
            row.note = "(full - 1-token generate) time"
        if name != base and raw_decode:
            row.baseline, row.ratio = base, row.value / raw_decode
            if name in STREAMING_FRONTENDS:
                row.target, row.met = f">= {DECODE_TARGET}", row.ratio >= DECODE_TARGET
        decode_rows.append(row)
    return ttft_rows + decode_rows


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write its files; returns the results (also written as JSON)."""
    args = _parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vllm_magic import get_session
    from vllm_magic.compat import vllm_version
    from vllm_magic.engine_config import platform_name

    platform = platform_name()
    size = dict(SIZES[args.size or ("gpu" if platform == "cuda" else "cpu")])
    for key in ("prompts", "tokens", "stream_tokens", "repeats", "stream_repeats", "ttft_repeats", "reload_repeats"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    engine_kwargs = json.loads(args.engine_args)
    pick = (lambda values, higher: best(values, higher)) if args.statistic == "best" else (lambda values, _: median(values))
    session = get_session()
    notes = list(args.note)
    rows: list[Row] = []

    if platform != "cuda":
        notes.append(f"{os.cpu_count()} CPU cores shared with other workloads: absolute numbers vary run to run; "
                     "ratios come from interleaved runs in one process.")

    def save(final: bool = False, extra: list[Row] = ()) -> dict[str, Any]:
        """Write what is measured so far (a long run that is cut short still leaves its rows)."""
        config, status = session_state["config"], session_state["status"]
        model_label = args.model_label or os.path.basename(str(config.model).rstrip("/"))
        results = {
            "meta": {
                "title": args.title or f"{model_label} on {platform.upper()}", "device": machine_description(),
                "platform": platform, "vllm_version": vllm_version(), "model": str(config.model),
                "model_label": model_label, "dtype": status.dtype, "engine_kwargs": dict(config.engine_kwargs),
                "max_model_len": status.max_model_len, "prompts": size["prompts"], "tokens": size["tokens"],
                "stream_tokens": size["stream_tokens"], "repeats": size["repeats"],
                "stream_repeats": size["stream_repeats"], "ttft_repeats": size["ttft_repeats"],
                "ttft_tokens": TTFT_TOKENS, "reload_repeats": size["reload_repeats"],
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": _platform.python_version(),
                "memory_kind": sampler.kind, "notes": notes, "complete": final,
                "statistic": args.statistic,
            },
            "rows": [r.as_dict() for r in [*rows, *extra]],
            "memory": {"peaks_bytes": dict(sampler.peaks), "marks_bytes": list(sampler.marks)},
        }
        tag = args.tag or f"{args.size or ('gpu' if platform == 'cuda' else 'cpu')}-{model_label}"
        paths = write_all(results, Path(args.out), tag, chart=final and not args.no_chart)
        results["paths"] = {k: str(v) for k, v in paths.items()}
        return results

    session_state: dict[str, Any] = {}
    with MemorySampler(platform) as sampler:
        baseline_memory = sampler.mark("before load")
        sampler.set_phase("engine")
        was_loaded = session.loaded
        _say(f"loading {args.model or 'the demo model'} {engine_kwargs}")
        info = session.load(args.model, **engine_kwargs)
        config = session.config
        leave_loaded = was_loaded and info.already_loaded
        status = session.status()
        session_state.update(config=config, status=status)
        _say(info.summary)
        if not info.already_loaded:
            rows.append(Row("load", "first load (vllm-magic session.load)", "s", info.seconds,
                            note="includes vLLM imports and engine start"))
        sampler.mark("after load")

        workload = Workload(session, make_prompts(size["prompts"]), size["tokens"], STREAM_PROMPT,
                            size["stream_tokens"])
        warm = Workload(session, make_prompts(2), 4, STREAM_PROMPT, 4)
        saved_defaults = session.defaults.as_dict()
        try:
            _say(f"batch: {size['prompts']} prompts x {size['tokens']} tokens, {size['repeats']} runs")
            rows += _batch_rows(_measure_group(BATCH, workload, size["repeats"], warm), pick)
            _say(f"time to first text: {TTFT_TOKENS}-token streams, {size['ttft_repeats']} runs")
            short = Workload(session, workload.prompts[:1], 4, STREAM_PROMPT, TTFT_TOKENS)
            ttft = _measure_group(STREAM, short, size["ttft_repeats"], warm)
            _say(f"single-stream decode: {size['stream_tokens']} tokens, {size['stream_repeats']} runs")
            decode = _measure_group(STREAM, workload, size["stream_repeats"], warm)
            rows += _stream_rows(ttft, decode, pick)
            save()
        finally:
            for key, value in saved_defaults.items():
                setattr(session.defaults, key, value)

        # ----- reloads with the same configuration ---------------------------------------------
        user_kwargs = dict(engine_kwargs)
        times, no_new = reload_session(session, args.model, user_kwargs, size["reload_repeats"])
        reload_rows = [Row("load", "session.load, same config", "ms", median(times), samples=times,
                           target=f"<= {RELOAD_TARGET_MS:g} ms", met=median(times) <= RELOAD_TARGET_MS and no_new,
                           note=f"median of {len(times)}" + ("" if no_new else "; a new engine was started!"))]
        from .frontends import magics_available

        if magics_available():
            line = magic_load_line(args.model, user_kwargs)
            try:
                times, no_new = reload_magic(workload.shell, session, line, size["reload_repeats"])
                reload_rows.append(Row("load", "%vllm_load, same config", "ms", median(times), samples=times,
                                       target=f"<= {RELOAD_TARGET_MS:g} ms",
                                       met=median(times) <= RELOAD_TARGET_MS and no_new,
                                       note=f"median of {len(times)}" + ("" if no_new else "; a new engine was started!")))
            except Exception as exc:
                reload_rows.append(Row("load", "%vllm_load, same config", "ms", available=False,
                                       note=f"error: {type(exc).__name__}: {exc}"[:300]))
        else:
            reload_rows.append(Row("load", "%vllm_load, same config", "ms", available=False,
                                   note="front-end not available"))
        rows += reload_rows
        peak_engine = sampler.peaks.get("engine")

        # ----- switch and back -------------------------------------------------------------------
        memory_rows = [Row("memory", "engine (peak while serving)", "GiB",
                           None if peak_engine is None else peak_engine / GiB)]
        switch_rows: list[Row] = []
        if not args.no_switch:
            current_len = status.max_model_len or 2048
            other_len = args.switch_max_model_len or max(256, current_len // 2)
            plan = [("switch", other_len, "after switch"), ("switch back", current_len, "after switch back")]
            for label, length, phase in plan[:1] if args.no_switch_back else plan:
                before = sampler.mark(f"before {label}")
                sampler.set_phase(phase)
                start = time.perf_counter()
                session.load(args.model, **{**user_kwargs, "max_model_len": length})
                seconds = time.perf_counter() - start
                _say(f"{label} to max_model_len={length}: {seconds:.1f} s")
                after = sampler.mark(f"after {label}")
                switch_rows.append(Row("load", f"{label}: max_model_len -> {length}", "s", seconds,
                                       note="shut down, check memory, start"))
                memory_rows.append(Row("memory", f"before {label}", "GiB", None if before is None else before / GiB))
                memory_rows.append(Row("memory", f"after {label}", "GiB", None if after is None else after / GiB))
                save(extra=switch_rows + memory_rows)
            rows += switch_rows

        # ----- unload, then the control -------------------------------------------------------------
        control_rows: list[Row] = []
        if not args.no_control:
            session.unload()
            gc_mark = sampler.mark("after unload")
            memory_rows.append(Row("memory", "after unload", "GiB", None if gc_mark is None else gc_mark / GiB))
            keep_first = not args.control_drop_first
            _say("control: constructing LangChain community's VLLM twice")
            control = community_vllm_twice(session, config.model, dict(config.engine_kwargs), sampler, keep_first)
            label = control["label"]
            if "package not installed" in label:
                notes.append("The control emulates langchain_community.llms.VLLM: langchain-community is not "
                             "installed here, so it runs what that class's validator runs, "
                             "vllm.LLM(model, tensor_parallel_size=1, trust_remote_code=False, dtype, "
                             "download_dir=None, **vllm_kwargs).")
            for i, seconds in enumerate(control["times"], 1):
                what = "first construction" if i == 1 else (
                    "re-run, first still referenced" if keep_first else "re-run, first dropped before")
                error = control["errors"][0] if seconds is None and control["errors"] else ""
                control_rows.append(Row("load", f"LangChain community VLLM(...) #{i} ({what})", "s", seconds,
                                        available=seconds is not None or bool(error),
                                        note=error or ""))
                mem = control["memory"][i - 1]
                memory_rows.append(Row("memory", f"control after construction #{i}", "GiB",
                                       None if mem is None else mem / GiB))
                if seconds is None and error:
                    control["errors"].pop(0)
            after = control["memory_after_cleanup"]
            memory_rows.append(Row("memory", "control shut down", "GiB", None if after is None else after / GiB))
            rows += control_rows
            first_build = control["times"][0]
            if first_build:
                for row in reload_rows:
                    if row.value is not None:
                        row.baseline, row.ratio = "control construction #1", row.value / 1e3 / first_build
        elif not leave_loaded:
            session.unload()
        if baseline_memory is not None:
            memory_rows.insert(0, Row("memory", "before load", "GiB", baseline_memory / GiB))
        rows += memory_rows

    from .frontends import RecordingShell

    RecordingShell.reset()
    results = save(final=True)
    _say("wrote " + ", ".join(results["paths"].values()))
    return results


def main(argv: list[str] | None = None) -> int:
    results = run(argv)
    print(Path(results["paths"]["md"]).read_text())
    missed = [r for r in results["rows"] if r.get("met") is False]
    for row in missed:
        print(f"target missed: {row['group']} / {row['name']}: {row['value']} ({row['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
