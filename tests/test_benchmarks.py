"""A small CPU run of the benchmark: it must run end to end on the live demo engine and write its
table, JSON and chart. Timings are not asserted (they depend on the machine)."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from benchmarks.loads import magic_load_line
from benchmarks.frontends import fresh_prefix_cache
from benchmarks.measure import Sample
from benchmarks.report import fill_doc, markdown_table
from benchmarks.run import failed_rows, make_prompts, paired_rows, run

# Over the suite's 15 min default: the smoke benchmark (its module fixture) starts a vLLM server and drives
# every front end.
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def smoke(engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    created = engine.engines_created
    results = run(["--size", "smoke", "--no-switch", "--no-control", "--out", str(out), "--tag", "smoke"])
    return results, out, created


def test_smoke_run_writes_table_json_and_chart(smoke):
    results, out, _ = smoke
    table = (out / "smoke.md").read_text()
    assert "| batch throughput | raw LLM.generate |" in table
    assert "| batch throughput | session.submit" in table
    assert "| time to first text | session streaming" in table
    for group in ("batch throughput, served", "time to first text, served", "decode, single stream, served"):
        for name in ("vllm serve + openai client", "%%vllm --remote (vllm serve)", "%%vllm in-process"):
            assert f"| {group} | {name}" in table
    assert "vLLM" in table and "SmolLM2-135M-Instruct" in table
    saved = json.loads((out / "smoke.json").read_text())
    assert saved["meta"]["prompts"] == 4 and saved["meta"]["tokens"] == 8
    # matplotlib is in the test extra: the chart is always drawn here
    assert (out / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_every_row_was_measured_and_no_front_end_failed(smoke):
    results, _, _ = smoke
    for row in results["rows"]:
        assert row["available"], row
        assert "error:" not in row["note"], row
        assert not row["failed"], row
    assert failed_rows(results) == []


def test_smoke_rows_did_the_same_work(smoke):
    results, _, _ = smoke
    meta = results["meta"]
    rows = {(r["group"], r["name"]): r for r in results["rows"]}
    raw = rows[("batch", "raw LLM.generate")]
    submit = rows[("batch", "session.submit")]
    assert raw["value"] > 0 and submit["value"] > 0
    assert len(submit["ratios"]) == meta["repeats"]
    assert submit["ratio"] == pytest.approx(statistics.median(submit["ratios"]))
    for row in results["rows"]:
        if row["group"] == "batch":
            assert row["tokens"] == [meta["prompts"] * meta["tokens"]] * meta["repeats"], row["name"]
        elif row["group"] == "ttft":
            assert row["tokens"] == [meta["ttft_tokens"]] * meta["ttft_repeats"], row["name"]
        elif row["group"] == "decode":
            assert row["tokens"] == [meta["stream_tokens"]] * meta["stream_repeats"], row["name"]
    for group in ("ttft", "decode"):
        assert rows[(group, "session streaming")]["available"]
        assert rows[(group, "raw engine step loop")]["value"] > 0
    assert {r["run_id"] for r in results["rows"]} == {meta["run_id"]}


def test_smoke_reused_the_live_engine(smoke, engine):
    results, _, created = smoke
    assert engine.engines_created == created  # same config: no second engine, and it stays loaded
    assert engine.loaded
    reload = next(r for r in results["rows"] if r["name"] == "session.load, same config")
    assert len(reload["samples"]) == 5


def test_frontends_that_are_missing_are_reported_not_hidden(smoke):
    results, _, _ = smoke
    names = {r["name"] for r in results["rows"]}
    assert {"%%vllm batch (---)", "LangChain llm.batch", "LangChain ChatVLLM.abatch", "%%vllm streaming",
            "LangChain llm.stream", "%vllm_load, same config"} <= names


def test_prompts_are_distinct():
    prompts = make_prompts(256)
    assert len(set(prompts)) == 256


def test_magic_load_line_round_trips_through_vllm_flags():
    from vllm_magic.engine.flags import load_flags

    kwargs = {"load_format": "dummy", "dtype": "bfloat16", "max_model_len": 4096, "enforce_eager": True}
    line = magic_load_line("/models/x", kwargs)
    assert line.startswith("/models/x ")
    assert load_flags(line.split(" ", 1)[1]).engine == kwargs


def test_markdown_marks_missed_targets():
    meta = {"title": "t", "device": "d", "vllm_version": "v", "model_label": "m", "dtype": "float32", "prompts": 1,
            "tokens": 1, "stream_tokens": 1, "repeats": 1, "stream_repeats": 1, "date": "now", "engine_kwargs": {}}
    rows = [{"group": "batch", "name": "x", "unit": "tok/s", "value": 10.0, "ratio": 0.5, "target": ">= 0.98",
             "met": False, "note": "", "available": True}]
    assert "| **no** |" in markdown_table({"meta": meta, "rows": rows})


async def test_awaiting_a_handle_is_not_woken_per_delta():
    """``await handle`` (abatch awaits hundreds at once) wakes its event loop once, at the end."""
    import asyncio
    import threading

    from vllm_magic.engine.requests.handles import RequestHandle

    loop = asyncio.get_running_loop()
    handles = [RequestHandle(f"r{i}", "p", [1], 1, lambda request_id: None) for i in range(8)]
    tasks = [asyncio.ensure_future(h.aresult()) for h in handles]
    await asyncio.sleep(0)
    wakeups = []
    original = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *args, **kw: (wakeups.append(args), original(*args, **kw))[1]
    try:
        def drive():
            for step in range(10):
                for h in handles:
                    h.push(0, "x", [1], None)
        thread = threading.Thread(target=drive)
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert wakeups == []
        for h in handles:
            h.finish()
        results = await asyncio.gather(*tasks)
    finally:
        del loop.call_soon_threadsafe
    assert [r.text for r in results] == ["x" * 10] * 8
    assert len(wakeups) == 8


def test_gpu_memory_is_summed_over_every_device(monkeypatch):
    """A tensor-parallel engine spans several GPUs: the sampler reads all of them, not GPU 0 alone."""
    import types

    from benchmarks.measure import engine_memory_now

    used = {0: 3 << 30, 1: 5 << 30}
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: len(used),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(used=used[handle]))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert engine_memory_now("cuda") == (8 << 30, "device memory in use")


def _paired(runs, problems=None, expected_tokens=8):
    return {r.name: r for r in paired_rows(
        "batch", "tok/s", {"runs": runs, "problems": problems or {}}, ["raw", "front"],
        value_of=lambda s: s.value, higher=True, pick=lambda values, _: statistics.median(values),
        compare=lambda a, b: a / b, expected_tokens=expected_tokens,
        target=lambda name: (">= 0.98", lambda r: r >= 0.98), describe=lambda name, samples: "")}


def test_ratio_is_the_median_of_per_run_ratios_not_a_ratio_of_medians():
    # Run 2 is slow for both (a busy machine): paired, it costs the front-end nothing.
    raw = [100.0, 50.0, 110.0]
    front = [99.0, 49.5, 108.9]
    runs = [{"raw": Sample(r, {"tokens": 8}), "front": Sample(f, {"tokens": 8})} for r, f in zip(raw, front)]
    rows = _paired(runs)
    assert rows["front"].ratios == pytest.approx([0.99, 0.99, 0.99])
    assert rows["front"].ratio == pytest.approx(0.99)
    assert rows["front"].met is True and not rows["front"].failed
    assert rows["front"].tokens == [8, 8, 8]


def test_ratios_pair_only_runs_where_both_sides_ran():
    runs = [{"raw": Sample(100.0, {"tokens": 8}), "front": Sample(90.0, {"tokens": 8})},
            {"front": Sample(10.0, {"tokens": 8})},
            {"raw": Sample(50.0, {"tokens": 8}), "front": Sample(50.0, {"tokens": 8})}]
    rows = _paired(runs, {"raw": "error: RuntimeError: boom"})
    assert rows["front"].ratios == pytest.approx([0.9, 1.0])
    assert rows["raw"].failed and rows["raw"].note == "error: RuntimeError: boom"
    assert not rows["front"].failed


def test_a_front_end_that_raised_once_fails_its_row_though_other_runs_measured():
    runs = [{"raw": Sample(100.0, {"tokens": 8}), "front": Sample(100.0, {"tokens": 8})},
            {"raw": Sample(100.0, {"tokens": 8})}]
    rows = _paired(runs, {"front": "error: ValueError: bad"})
    assert rows["front"].value == 100.0 and rows["front"].failed
    assert "error: ValueError: bad" in rows["front"].note


def test_a_token_count_unlike_raw_vllms_fails_the_row():
    runs = [{"raw": Sample(100.0, {"tokens": 8}), "front": Sample(120.0, {"tokens": 6})}]
    rows = _paired(runs)
    assert rows["front"].failed and not rows["raw"].failed
    assert "run 1: 6 tokens, not 8" in rows["front"].note
    short_raw = _paired(runs, expected_tokens=6)
    assert short_raw["raw"].failed and "run 1: 8 tokens, not 6" in short_raw["raw"].note


def test_nan_decode_runs_are_left_out_of_values_and_ratios():
    runs = [{"raw": Sample(100.0, {"tokens": 8}), "front": Sample(math.nan, {"tokens": 8})},
            {"raw": Sample(100.0, {"tokens": 8}), "front": Sample(95.0, {"tokens": 8})}]
    rows = _paired(runs)
    assert rows["front"].samples == [95.0] and rows["front"].ratios == pytest.approx([0.95])


def test_failed_rows_make_the_command_fail():
    ok = {"group": "batch", "name": "a", "note": "", "failed": False}
    raised = {"group": "batch", "name": "b", "note": "error: RuntimeError: x", "failed": True}
    old_format = {"group": "batch", "name": "c", "note": "error: RuntimeError: y", "available": False}
    assert failed_rows({"rows": [ok]}) == []
    assert failed_rows({"rows": [ok, raised, old_format]}) == [raised, old_format]


def _results(run_id, rows):
    meta = {"title": "t", "device": "d", "vllm_version": "v", "model_label": "m", "dtype": "float32", "prompts": 1,
            "tokens": 1, "stream_tokens": 1, "repeats": 1, "stream_repeats": 1, "date": "now", "engine_kwargs": {},
            "run_id": run_id, "pairing": "median of per-run ratios", "prefix_cache": "reset"}
    return {"meta": meta, "rows": rows}


def test_a_table_refuses_rows_of_another_run(tmp_path):
    row = {"group": "batch", "name": "x", "unit": "tok/s", "value": 10.0, "note": "", "run_id": "aaa"}
    assert "| x | 10.0 tok/s |" in markdown_table(_results("aaa", [row]))
    with pytest.raises(ValueError, match="another run"):
        markdown_table(_results("bbb", [row]))


def test_the_doc_is_filled_from_each_json_not_from_an_edited_md(tmp_path):
    row = {"group": "batch", "name": "x", "unit": "tok/s", "value": 10.0, "note": "", "run_id": "aaa"}
    (tmp_path / "run.json").write_text(json.dumps(_results("aaa", [row])))
    (tmp_path / "run.md").write_text("| batch throughput | x | 99 tok/s (from elsewhere) |")
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- results: run -->\nstale\n<!-- /results -->\nafter\n")
    fill_doc(doc, tmp_path)
    text = doc.read_text()
    assert "10.0 tok/s" in text and "99 tok/s" not in text and "stale" not in text
    assert text.startswith("before\n") and text.endswith("after\n")


def test_old_results_render_and_say_they_predate_paired_runs():
    old = []
    for path in sorted((Path(__file__).parents[1] / "benchmarks" / "results").glob("*.json")):
        data = json.loads(path.read_text())
        if "rows" in data and "pairing" not in data["meta"]:
            old.append(path.name)
            assert "Taken before paired runs" in markdown_table(data), path.name
    assert len(old) >= 5, f"the stored results from before paired runs are gone: {old}"  # 6 when written


def test_prefix_cache_reset_makes_the_next_run_compute_its_prompt_again(engine):
    """The benchmark's runs send the same prompts: without the reset, later runs find them cached."""
    from vllm import SamplingParams

    # Only whole cache blocks are cached (128 tokens on CPU): a few hundred tokens fill some.
    prompt = "Cache me: " + " ".join(["a long enough prompt to fill several cache blocks"] * 40)
    params = SamplingParams(temperature=0.0, max_tokens=2)

    def cached_tokens(llm):
        return llm.generate([prompt], params, use_tqdm=False)[0].num_cached_tokens

    engine.run_on_engine(fresh_prefix_cache)
    assert engine.run_on_engine(cached_tokens) == 0
    assert engine.run_on_engine(cached_tokens) > 0  # the prefix cache is on: a repeat is cheaper
    engine.run_on_engine(fresh_prefix_cache)
    assert engine.run_on_engine(cached_tokens) == 0


def test_scaling_results_render_to_their_stored_table():
    from benchmarks.scaling import to_markdown

    results = Path(__file__).parents[1] / "benchmarks" / "results"
    data = json.loads((results / "cpu-scaling.json").read_text())
    assert data["meta"]["pairing"]
    assert to_markdown(data["rows"], data["meta"]).strip() == (results / "cpu-scaling.md").read_text().strip()


def test_the_embeddings_benchmark_pairs_the_session_with_raw_vllm_on_one_engine(engine):
    from benchmarks.embeddings import run as run_embeddings

    try:
        results = run_embeddings(["--rounds", "2", "--texts", "8"])
        embedder = engine.embedder
        again = run_embeddings(["--rounds", "1", "--texts", "4"])
        assert engine.embedder is embedder  # the live embedder served the second run: no second engine
    finally:
        engine.unload_embedder()
    assert engine.loaded  # the generation engine stayed
    assert results["dimension"] == 576 and results["texts"] == 8 and len(again["rounds"]["batch"]) == 1
    batch, single = results["rounds"]["batch"], results["rounds"]["single"]
    assert len(batch) == len(single) == 2
    assert all(r["raw_per_s"] > 0 and r["session_per_s"] > 0 for r in batch)
    assert all(r["raw_ms"] > 0 and r["session_ms"] > 0 for r in single)
    assert results["ratios"]["batch: session / raw embeddings per second"] == pytest.approx(
        statistics.median(r["session_per_s"] / r["raw_per_s"] for r in batch))


def test_feature_benchmarks_take_each_ratio_within_a_round_and_report_its_median(tmp_path, capsys):
    from benchmarks.rounds import median_ratio, medians_of, print_tables, results, write_json

    rows = [{"a": 10.0, "b": 5.0}, {"a": 9.0, "b": 9.0}, {"a": 30.0, "b": 10.0}]
    assert median_ratio(rows, "a", "b") == 2.0  # the ratios 2, 1, 3: not the ratio of medians (10 / 9)
    medians = medians_of({"g": rows, "empty": []})
    assert medians == {"g": {"a": 10.0, "b": 9.0}}
    print_tables("demo on cpu", {"a / b": 2.0}, medians)
    printed = capsys.readouterr().out
    assert "demo on cpu" in printed and "| a / b | 2.000 |" in printed and "| g: b | 9.0 |" in printed
    data = results("demo", "cpu", "0.32.0", {"g": rows}, {"a / b": 2.0}, medians, texts=8)
    write_json(tmp_path / "out.json", data)
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["texts"] == 8 and written["ratios"] == {"a / b": 2.0} and written["rounds"]["g"] == rows
    assert written["model"] == "demo" and written["vllm"] == "0.32.0" and written["when"]
