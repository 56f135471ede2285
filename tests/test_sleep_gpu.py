"""Sleep mode on a real GPU engine: memory given back, the same greedy tokens after waking, and
switching back to a kept engine by waking it. Runs on an NVIDIA GPU only (the ``gpu`` marker)."""

from __future__ import annotations

import pytest
from ipython_capture import make_shell

from vllm_magic.engine.backends.local import device_memory_used
from vllm_magic.magics.commands import VllmMagics

pytestmark = pytest.mark.gpu

GiB = 1 << 30
PROMPT = "List the planets of the solar system, one per line."


def greedy_ids(session) -> list[int]:
    return session.generate(PROMPT, temperature=0, max_tokens=24, ignore_eos=True).token_ids


def test_the_gpu_engine_runs_in_sleep_mode_by_default(engine):
    assert engine.status().platform == "cuda"
    assert engine.config.engine_kwargs["enable_sleep_mode"] is True


def test_level_1_sleep_frees_gpu_memory_and_waking_gives_the_same_greedy_tokens(engine):
    before = greedy_ids(engine)
    report = engine.sleep(1)
    assert report.level == 1 and report.freed_bytes > 1 * GiB
    assert engine.status().asleep is report
    assert engine.wake() > 0
    assert engine.asleep is None
    assert greedy_ids(engine) == before


def test_level_2_discards_the_weights_and_a_request_wakes_and_reloads_them(engine):
    before = greedy_ids(engine)
    report = engine.sleep(2)
    assert report.level == 2 and report.freed_bytes > 1 * GiB
    assert greedy_ids(engine) == before  # the request woke the engine, which reloaded its weights
    assert engine.asleep is None


def test_sleep_and_wake_magics_report_in_one_line_and_status_shows_the_sleep(engine, capsys):
    magics = VllmMagics(shell=make_shell()[0], session=engine)
    magics.vllm_sleep("1")
    out = capsys.readouterr().out
    assert "asleep (level 1: weights in host RAM, KV cache discarded" in out and "GiB of GPU memory freed" in out
    assert "| state | asleep (level 1)" in magics.vllm_status("")._repr_markdown_()
    magics.vllm_wake("")
    assert "awake in" in capsys.readouterr().out


def test_keep_switches_back_by_waking_the_kept_engine_and_unload_frees_every_engine(engine):
    start = device_memory_used("cuda")
    full = engine.status().max_model_len
    before = greedy_ids(engine)
    created = engine.engines_created
    switched = engine.load(max_model_len=1024, keep=True)
    assert switched.kept and "kept asleep (level 1" in switched.kept
    assert [k.level for k in engine.kept] == [1]
    back = engine.load(max_model_len=full, keep=True)
    assert back.woken and engine.engines_created == created + 1
    assert engine.status().max_model_len == full and [k.level for k in engine.kept] == [1]
    assert greedy_ids(engine) == before
    engine.unload()
    assert engine.kept == [] and not engine.loaded
    assert engine.last_unload.device_memory_returned
    assert device_memory_used("cuda") <= start  # both engines' memory came back
