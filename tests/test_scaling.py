"""Tensor parallel and AWQ on a real CPU engine: TP 2 answers as TP 1 does, AWQ answers, switches
between them leave nothing of the old engine behind.

These engines run in a session of their own (not the suite's shared demo engine), started and
stopped here.
"""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError

from child_processes import engine_children
from vllm_magic.demo_variants import prepare_awq_demo_model, prepare_tiny_model
from vllm_magic.engine import config as engine_config
from vllm_magic.engine.session import EngineSession

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three fruits.",
           "Explain gravity in one sentence."]


def _greedy_ids(session: EngineSession) -> list[list[int]]:
    handles = session.submit(PROMPTS, temperature=0, max_tokens=40)
    return [handle.result().token_ids for handle in handles]


@pytest.fixture
def session():
    own = EngineSession()
    yield own
    own.unload()


def test_tp2_then_tp1_then_awq_give_the_demo_models_greedy_ids_and_paris_and_leave_no_old_process(engine, session):
    tiny, awq = str(prepare_tiny_model(quiet=True)), str(prepare_awq_demo_model(quiet=True))
    demo_ids = _greedy_ids(engine)  # the suite's demo engine: the tiny model's added heads are zero
    before = engine_children()

    info = session.load(tiny, tensor_parallel_size=2)
    assert "tensor parallel 2, threads on cores " in info.summary, info.summary
    assert session.config.cpu_threads.count("|") == 1
    tp2 = engine_children() - before
    assert len(tp2) >= 3, "tensor parallel 2 runs an engine core and two workers"
    ids_tp2 = _greedy_ids(session)

    info = session.load(tiny, tensor_parallel_size=1)
    assert not info.already_loaded and "tensor parallel" not in info.summary
    assert not tp2 & engine_children(), "a process of the TP 2 engine survived the switch"
    tp1 = engine_children() - before
    ids_tp1 = _greedy_ids(session)
    assert ids_tp1 == ids_tp2
    assert ids_tp1 == demo_ids
    assert all(len(ids) > 5 for ids in ids_tp1)

    info = session.load(awq, quantization="awq")
    assert "float16, awq" in info.summary, info.summary
    assert not tp1 & engine_children(), "a process of the TP 1 engine survived the switch"
    answer = session.generate("What is the capital of France?", temperature=0, max_tokens=24)
    assert "Paris" in answer.text

    session.unload()
    assert not engine_children() - before, "a process of the AWQ engine survived the unload"


def test_a_tensor_parallel_size_beyond_the_cores_is_one_line_and_keeps_the_engine(engine, ip, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(engine_config, "_usable_cores", lambda: [0, 1])
    tiny = str(prepare_tiny_model(quiet=True))
    created, pids = engine.engines_created, engine_children()
    with pytest.raises(UsageError) as caught:
        ip.run_line_magic("vllm_load", f"{tiny} --tensor-parallel-size 4")
    assert str(caught.value) == ("tensor parallel 4 needs 4 CPU cores (one per rank), and this process may "
                                 "use 2: use fewer ranks, or set VLLM_CPU_OMP_THREADS_BIND yourself")
    assert engine.engines_created == created and engine_children() == pids
    assert "Paris" in engine.generate("What is the capital of France?", temperature=0, max_tokens=16).text
