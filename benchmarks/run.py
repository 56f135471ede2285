"""Run the benchmark: ``python -m benchmarks.run [--size smoke|cpu|gpu] [--model PATH] ...``.

In one process, on one engine, with the same prompts, it measures raw vLLM and each front-end of
vllm-magic (batch throughput, single-stream time to first text and decode rate), then reloads with
the same configuration, switches ``max_model_len`` and back, unloads, and constructs LangChain
community's ``VLLM`` twice as the control; engine memory is sampled all along. Results go to
``benchmarks/results/TAG.{json,md,png}``.

Front-ends run interleaved with raw vLLM; each one's comparison with raw vLLM is the median of its
per-run ratios (time to first text: of per-run differences), and each run's output token count must
equal raw vLLM's. vLLM's prefix cache is emptied before every timed run, so that no run reuses the
prompt computation of an earlier one.

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
import uuid
from pathlib import Path
from typing import Any, Callable

from .frontends import BATCH, STREAM, Workload, fresh_prefix_cache
from .loads import community_vllm_twice, magic_load_line, reload_magic, reload_session
from .measure import MemorySampler, Row, Sample, best, machine_description, median
from .report import write_all

__all__ = ["main", "run", "SIZES", "failed_rows", "paired_rows"]

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
TTFT_TARGET_MS = 1.0
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
# How the results were taken, recorded in each JSON (older results have neither key).
PAIRING = "median of per-run ratios to raw vLLM in the same interleaved run"
PREFIX_CACHE = "reset before every timed run and warm-up"
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
    p.add_argument("--served-only", action="store_true",
                   help="only the served engine's rows (the openai client, %%%%vllm --remote and LangChain over it)")
    p.add_argument("--no-served", action="store_true",
                   help="skip the served engine (%%%%vllm --remote and the openai client against vllm serve)")
    p.add_argument("--control-drop-first", action="store_true",
                   help="drop the control's first engine before building the second (memory-tight machines)")
    p.add_argument("--title", default=None, help="table title")
    p.add_argument("--tag", default=None, help="file name stem of the results (default: SIZE-MODEL)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results directory")
    p.add_argument("--note", action="append", default=[], help="a note for the table (repeatable)")
    p.add_argument("--statistic", choices=("median", "best"), default="median",
                   help="how a row's runs are summarized: median, or best (max tok/s, min ms) on a busy shared "
                        "machine; the comparison with raw vLLM is the median of per-run ratios either way")
    p.add_argument("--no-chart", action="store_true")
    return p.parse_args(argv)


def _say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _error(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {exc}"[:300]


def _measure_group(entries, workload: Workload, repeats: int, warm: Workload,
                   fresh: Callable[[], None]) -> dict[str, Any]:
    """Warm each front-end up once, then run them interleaved ``repeats`` times.

    Returns ``{"runs": [{name: Sample}, ...], "problems": {name: note}}``, one dict per run.
    ``fresh()`` comes before every call, warm-ups included: no call finds its prompts already
    computed (prefix cache) by an earlier one.
    """
    runs: list[dict[str, Sample]] = []
    problems: dict[str, str] = {}
    live = []
    for name, fn, needs in entries:
        if needs is not None and not needs():
            problems[name] = "front-end not available"
            continue
        try:
            fresh()
            fn(warm)
            live.append((name, fn))
        except Exception as exc:  # a front-end that fails is reported, the others still run
            problems[name] = _error(exc)
            _say(f"{name}: {problems[name]}")
    for rep in range(repeats):
        run: dict[str, Sample] = {}
        # Rotate the order each run so that no front-end always runs first (GPU clocks, caches).
        turn = rep % len(live) if live else 0
        for name, fn in live[turn:] + live[:turn]:
            try:
                fresh()
                run[name] = fn(workload)
            except Exception as exc:
                problems[name] = _error(exc)
                _say(f"{name}: {problems[name]}")
        runs.append(run)
        _say(f"run {rep + 1}/{repeats}: " + ", ".join(f"{n} {run[n].value:,.1f}" for n, _ in live if n in run))
    return {"runs": runs, "problems": problems}


def paired_rows(group: str, unit: str, measured: dict[str, Any], names: list[str], *,
                value_of: Callable[[Sample], float], higher: bool,
                pick: Callable[[list[float], bool], float], compare: Callable[[float, float], float],
                expected_tokens: int, target: Callable[[str], tuple[str, Callable[[float], bool]] | None],
                describe: Callable[[str, list[Sample]], str]) -> list[Row]:
    """One row per front-end in ``names``; the first is the raw baseline.

    The row's value summarizes its runs (``pick``); its comparison with the baseline is paired:
    the median of ``compare(front-end, baseline)`` over the runs where both have a value, so
    that whatever slowed one run down weighs on both sides of that run's ratio. Each run's output
    token count must equal the baseline's in the same run, and the baseline's ``expected_tokens``;
    a front-end that raised, or generated another count, fails its row.
    """
    base, runs, problems = names[0], measured["runs"], measured["problems"]
    rows = []
    for name in names:
        mine = [(i, run[name]) for i, run in enumerate(runs) if name in run]
        kept = [(i, s, value_of(s)) for i, s in mine if not math.isnan(value_of(s))]
        row = Row(group, name, unit, samples=[v for _, _, v in kept],
                  tokens=[int(s.extra["tokens"]) for _, s, _ in kept], available=bool(mine))
        if row.samples:
            row.value = pick(row.samples, higher)
        wrong = []
        for i, sample in mine:
            # Raw vLLM's count in the same run; where raw vLLM has none, the count asked for.
            reference = runs[i][base].extra["tokens"] if name != base and base in runs[i] else expected_tokens
            if sample.extra["tokens"] != reference:
                wrong.append(f"run {i + 1}: {sample.extra['tokens']:g} tokens, not {reference:g}")
        if name != base:
            row.ratios = [compare(v, value_of(runs[i][base])) for i, _, v in kept
                          if base in runs[i] and not math.isnan(value_of(runs[i][base]))]
            if row.ratios:
                row.baseline, row.ratio = base, median(row.ratios)
                wanted = target(name)
                if wanted is not None:
                    row.target, row.met = wanted[0], wanted[1](row.ratio)
        problem = problems.get(name, "")
        row.failed = problem.startswith("error:") or bool(wrong)
        row.note = "; ".join(part for part in (
            describe(name, [s for _, s in mine]), problem,
            f"generated other token counts than {'asked' if name == base else 'raw vLLM'}: {', '.join(wrong)}"
            if wrong else "") if part)
        rows.append(row)
    return rows


def _describe_batch(name: str, samples: list[Sample]) -> str:
    extras = [s.extra for s in samples if "head_ms" in s.extra]
    if not extras:
        return ""
    return (f"{median([e['head_ms'] for e in extras]):.0f} ms before the first request, "
            f"{median([e['tail_ms'] for e in extras]):.0f} ms after the last")


def _describe_ttft(name: str, samples: list[Sample]) -> str:
    heads = [s.extra["head_ms"] for s in samples if "head_ms" in s.extra]
    if heads:
        return f"{median(heads):.2f} ms before the request reached the session"
    return "no streaming: a 1-token generate" if name == "raw LLM.generate" else ""


def _describe_decode(name: str, samples: list[Sample]) -> str:
    return "(full - 1-token generate) time" if name == "raw LLM.generate" else ""


def _batch_rows(measured: dict, pick: Callable[[list[float], bool], float], workload: Workload) -> list[Row]:
    """Throughput of each batch front-end, and its per-run ratio to raw ``LLM.generate``."""
    return paired_rows(
        "batch", "tok/s", measured, [name for name, _, _ in BATCH], value_of=lambda s: s.value, higher=True,
        pick=pick, compare=lambda a, b: a / b, expected_tokens=len(workload.prompts) * workload.tokens,
        target=lambda name: (f">= {BATCH_TARGET}", lambda r: r >= BATCH_TARGET), describe=_describe_batch)


def _stream_rows(ttft_measured: dict, decode_measured: dict, pick: Callable[[list[float], bool], float],
                 short: Workload, workload: Workload) -> list[Row]:
    """Time to first text from the short runs (per-run differences to the raw engine loop, in ms),
    decode rate from the long ones (per-run ratios)."""
    names = [name for name, _, _ in STREAM]

    def streaming(text: str, check: Callable[[float], bool]):
        return lambda name: (text, check) if name in STREAMING_FRONTENDS else None

    ttft = paired_rows(
        "ttft", "ms", ttft_measured, names, value_of=lambda s: s.value, higher=False, pick=pick,
        compare=lambda a, b: a - b, expected_tokens=short.stream_tokens,
        target=streaming(f"<= +{TTFT_TARGET_MS:g} ms", lambda r: r <= TTFT_TARGET_MS), describe=_describe_ttft)
    decode = paired_rows(
        "decode", "tok/s", decode_measured, names, value_of=lambda s: s.extra["decode"], higher=True,
        pick=pick, compare=lambda a, b: a / b, expected_tokens=workload.stream_tokens,
        target=streaming(f">= {DECODE_TARGET}", lambda r: r >= DECODE_TARGET), describe=_describe_decode)
    return ttft + decode


def _served_rows(session: Any, size: dict, pick: Callable[[list[float], bool], float], workload: Workload,
                 short: Workload, warm: Workload, config: Any = None) -> list[Row]:
    """The same batch and stream against ``vllm serve``: the openai client (this group's baseline),
    ``%%vllm --remote``, and ``%%vllm`` in process, interleaved in the same runs."""
    from .served import OPENAI, REMOTE_ROWS, REMOTE_TARGETS, served_entries, start_served

    _say("served engine: starting vllm serve with the same configuration")
    served = start_served(session, config)
    try:
        twins = {id(w): (Workload(served.remote, w.prompts, w.tokens, w.stream_prompt, w.stream_tokens), w)
                 for w in (workload, short, warm)}
        batch_entries, stream_entries = served_entries(served, twins)
        _say(f"served batch: {size['prompts']} prompts x {size['tokens']} tokens, {size['repeats']} runs")
        batch = _measure_group(batch_entries, workload, size["repeats"], warm, served.fresh)
        _say(f"served first text: {size['ttft_repeats']} runs; decode: {size['stream_repeats']} runs")
        ttft = _measure_group(stream_entries, short, size["ttft_repeats"], warm, served.fresh)
        decode = _measure_group(stream_entries, workload, size["stream_repeats"], warm, served.fresh)
    finally:
        workload.shell.bind(session)  # the magics go back to the in-process engine's session
        served.stop()
    names = [name for name, _, _ in batch_entries]
    describe = {OPENAI: "the baseline of the served rows: the same server, the same runs"}

    def note(name: str, samples: list[Sample]) -> str:
        return describe.get(name, "")

    def remote(text: str, check: Callable[[float], bool]):
        return lambda name: (text, check) if name in REMOTE_ROWS else None

    batch_goal, ttft_goal, decode_goal = REMOTE_TARGETS["batch"], REMOTE_TARGETS["ttft_ms"], REMOTE_TARGETS["decode"]
    rows = paired_rows("served batch", "tok/s", batch, names, value_of=lambda s: s.value, higher=True, pick=pick,
                       compare=lambda a, b: a / b, expected_tokens=len(workload.prompts) * workload.tokens,
                       target=remote(f">= {batch_goal:g}", lambda r: r >= batch_goal), describe=note)
    names = [name for name, _, _ in stream_entries]
    rows += paired_rows("served ttft", "ms", ttft, names, value_of=lambda s: s.value, higher=False, pick=pick,
                        compare=lambda a, b: a - b, expected_tokens=short.stream_tokens,
                        target=remote(f"<= +{ttft_goal:g} ms", lambda r: r <= ttft_goal), describe=note)
    rows += paired_rows("served decode", "tok/s", decode, names, value_of=lambda s: s.extra["decode"],
                        higher=True, pick=pick, compare=lambda a, b: a / b, expected_tokens=workload.stream_tokens,
                        target=remote(f">= {decode_goal:g}", lambda r: r >= decode_goal), describe=note)
    return rows


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write its files; returns the results (also written as JSON)."""
    args = _parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vllm_magic import get_session
    from vllm_magic.engine.compat import vllm_version
    from vllm_magic.engine.platform import platform_name

    platform = platform_name()
    size = dict(SIZES[args.size or ("gpu" if platform == "cuda" else "cpu")])
    for key in ("prompts", "tokens", "stream_tokens", "repeats", "stream_repeats", "ttft_repeats", "reload_repeats"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    engine_kwargs = json.loads(args.engine_args)
    pick = (lambda values, higher: best(values, higher)) if args.statistic == "best" else (lambda values, _: median(values))
    session = get_session()
    run_id = uuid.uuid4().hex[:12]  # every row carries it: a table refuses rows of another run
    notes = list(args.note)
    rows: list[Row] = []

    if not args.no_served:
        notes.append("Served rows (`vllm serve` started as %vllm_serve starts it, same engine configuration): "
                     "their comparison column is against `vllm serve` + the openai client on the same server in "
                     "the same interleaved runs, not against raw vLLM.")
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
                "statistic": args.statistic, "run_id": run_id, "pairing": PAIRING, "prefix_cache": PREFIX_CACHE,
            },
            "rows": [{**r.as_dict(), "run_id": run_id} for r in [*rows, *extra]],
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
        if args.served_only:  # the server holds the engine: none is loaded in this process
            from vllm_magic.engine.status import SessionStatus

            config = session.resolve(args.model, **engine_kwargs)
            session_state.update(config=config, status=SessionStatus(
                loaded=False, dtype=config.engine_kwargs.get("dtype"),
                max_model_len=config.engine_kwargs.get("max_model_len")))
            workload = Workload(session, make_prompts(size["prompts"]), size["tokens"], STREAM_PROMPT,
                                size["stream_tokens"])
            warm = Workload(session, make_prompts(2), 4, STREAM_PROMPT, 4)
            short = Workload(session, workload.prompts[:1], 4, STREAM_PROMPT, TTFT_TOKENS)
            rows += _served_rows(session, size, pick, workload, short, warm, config)
            from .frontends import RecordingShell

            RecordingShell.reset()
            results = save(final=True)
            _say("wrote " + ", ".join(results["paths"].values()))
            return results
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
        short = Workload(session, workload.prompts[:1], 4, STREAM_PROMPT, TTFT_TOKENS)
        saved_defaults = session.defaults.as_dict()

        def fresh() -> None:
            session.run_on_engine(fresh_prefix_cache)

        try:
            _say(f"batch: {size['prompts']} prompts x {size['tokens']} tokens, {size['repeats']} runs")
            batch = _measure_group(BATCH, workload, size["repeats"], warm, fresh)
            rows += _batch_rows(batch, pick, workload)
            _say(f"time to first text: {TTFT_TOKENS}-token streams, {size['ttft_repeats']} runs")
            ttft = _measure_group(STREAM, short, size["ttft_repeats"], warm, fresh)
            _say(f"single-stream decode: {size['stream_tokens']} tokens, {size['stream_repeats']} runs")
            decode = _measure_group(STREAM, workload, size["stream_repeats"], warm, fresh)
            rows += _stream_rows(ttft, decode, pick, short, workload)
            save()
            if not args.no_served:
                rows += _served_rows(session, size, pick, workload, short, warm)
                if not session.loaded:  # it made room for the server on a GPU: back for the reloads
                    session.load(args.model, **engine_kwargs)
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
                                       note=_error(exc), failed=True))
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


def failed_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows whose front-end raised or generated other token counts than raw vLLM."""
    return [r for r in results["rows"] if r.get("failed") or r.get("note", "").startswith("error:")]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table; exit status 1 when a row failed (missed targets are
    results, not failures)."""
    results = run(argv)
    print(Path(results["paths"]["md"]).read_text())
    missed = [r for r in results["rows"] if r.get("met") is False]
    for row in missed:
        print(f"target missed: {row['group']} / {row['name']}: {row['value']} ({row['target']})")
    failed = failed_rows(results)
    for row in failed:
        print(f"failed: {row['group']} / {row['name']}: {row['note']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
