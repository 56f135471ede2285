"""A small CPU run of the benchmark: it must run end to end on the live demo engine and write its
table, JSON and chart. Timings are not asserted (they depend on the machine)."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks.loads import magic_load_line
from benchmarks.report import markdown_table
from benchmarks.run import make_prompts, run


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
    assert "vLLM" in table and "SmolLM2-135M-Instruct" in table
    saved = json.loads((out / "smoke.json").read_text())
    assert saved["meta"]["prompts"] == 4 and saved["meta"]["tokens"] == 8
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_rows_did_the_same_work(smoke):
    results, _, _ = smoke
    rows = {(r["group"], r["name"]): r for r in results["rows"]}
    raw = rows[("batch", "raw LLM.generate")]
    submit = rows[("batch", "session.submit")]
    assert raw["value"] > 0 and submit["value"] > 0
    assert submit["ratio"] == pytest.approx(submit["value"] / raw["value"])
    for group in ("ttft", "decode"):
        assert rows[(group, "session streaming")]["available"]
        assert rows[(group, "raw engine step loop")]["value"] > 0


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
    from vllm_magic.engine_config import parse_engine_flags

    kwargs = {"load_format": "dummy", "dtype": "bfloat16", "max_model_len": 4096, "enforce_eager": True}
    line = magic_load_line("/models/x", kwargs)
    assert line.startswith("/models/x ")
    assert parse_engine_flags(line.split(" ", 1)[1]) == kwargs


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

    from vllm_magic.handles import RequestHandle

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
                    h._push(0, "x", [1], None)
        thread = threading.Thread(target=drive)
        thread.start()
        thread.join()
        assert wakeups == []
        for h in handles:
            h._finish()
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
