"""Tensor parallel and AWQ on a real CPU engine: the README's examples run as written, TP 2 answers
as TP 1 does, AWQ answers, switches between them leave nothing of the old engine behind.

These engines run in a session of their own (not the suite's shared demo engine), started and
stopped here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from IPython.core.error import UsageError

from child_processes import engine_children
from ipython_capture import make_shell
from test_notebook_outputs import assert_plausible_engine_memory
from vllm_magic.demo.variants import prepare_tiny_model
from vllm_magic.engine import platform as engine_platform
from vllm_magic.engine.session import EngineSession

README = Path(__file__).resolve().parent.parent / "README.md"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three fruits.",
           "Explain gravity in one sentence."]


def _greedy_ids(session: EngineSession) -> list[list[int]]:
    handles = session.submit(PROMPTS, temperature=0, max_tokens=40)
    return [handle.result(timeout=300).token_ids for handle in handles]


@pytest.fixture
def session(monkeypatch):
    """A session of the test's own, which the magics of its shell use: the demo engine stays loaded."""
    import vllm_magic

    own = EngineSession()
    monkeypatch.setattr(vllm_magic, "get_session", lambda: own)
    yield own
    own.unload()


def _readme_blocks() -> list[str]:
    text = README.read_text()
    start, end = text.index("<!-- section: scaling -->"), text.index("<!-- section: python-api -->")
    return re.findall(r"```ipython\n(.*?)```", text[start:end], flags=re.S)


@pytest.mark.timeout(2700)  # three engine starts (70-210 s each seen here, more under load) and a switch
def test_readme_tour_tp2_then_tp1_then_awq_gives_the_demo_models_ids_and_paris_and_leaves_no_old_process(
        engine, session, capsys):
    """The README's examples as written (TP 2, then AWQ), with a switch to TP 1 between them."""
    from vllm_magic.magics import register, unregister

    blocks = _readme_blocks()
    assert len(blocks) == 4 and "--tensor-parallel-size 2" in blocks[0] and "--quantization awq" in blocks[2]
    demo_ids = _greedy_ids(engine)  # the suite's demo engine: the tiny model's added heads are zero
    before = engine_children()
    ip, _ = make_shell()
    try:
        register(ip, session=session)

        def run(block: str):
            result = ip.run_cell(block)
            assert result.success, f"README block failed:\n{block}\n{result.error_in_exec or result.error_before_exec}"
            return result.result

        run(blocks[0])  # prepares both variants, loads the tiny model under tensor parallel 2
        assert "SmolLM2-135M-Instruct-TP4 loaded on cpu (float32, tensor parallel 2, threads on cores " \
            in capsys.readouterr().out
        assert session.config.cpu_threads.count("|") == 1
        tp2 = engine_children() - before
        assert len(tp2) >= 3, "tensor parallel 2 runs an engine core and two workers"
        assert "Paris" in run(blocks[1]).text
        ids_tp2 = _greedy_ids(session)
        memory = {"TP 2": session.status().memory_bytes}  # as notebooks/05-scaling.ipynb measures it

        info = session.load(ip.user_ns["tiny"], tensor_parallel_size=1)  # a Path, as prepare_tiny_model() gives
        assert not info.already_loaded and "tensor parallel" not in info.summary
        assert not tp2 & engine_children(), "a process of the TP 2 engine survived the switch"
        tp1 = engine_children() - before
        ids_tp1 = _greedy_ids(session)
        memory["TP 1"] = session.status().memory_bytes
        assert ids_tp1 == ids_tp2
        assert ids_tp1 == demo_ids
        assert all(len(ids) > 5 for ids in ids_tp1)

        run(blocks[2])
        assert "SmolLM2-135M-Instruct-AWQ loaded on cpu (float16, awq" in capsys.readouterr().out
        assert not tp1 & engine_children(), "a process of the TP 1 engine survived the switch"
        assert "Paris" in run(blocks[3]).text
        memory["AWQ"] = session.status().memory_bytes
        # What the notebook's memory table shows (nbval only sees "<MEM>" there), on these engines.
        assert_plausible_engine_memory(memory)
    finally:
        unregister(ip, shutdown=False)
        type(ip).clear_instance()
    session.unload()
    assert not engine_children() - before, "a process of the AWQ engine survived the unload"


def test_a_tensor_parallel_size_beyond_the_cores_is_one_line_and_keeps_the_engine(engine, ip, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(engine_platform, "_usable_cores", lambda: [0, 1])
    tiny = str(prepare_tiny_model(quiet=True))
    created, pids = engine.engines_created, engine_children()
    with pytest.raises(UsageError) as caught:
        ip.run_line_magic("vllm_load", f"{tiny} --tensor-parallel-size 4")
    assert str(caught.value) == ("tensor parallel 4 needs 4 CPU cores (one per rank), and this process may "
                                 "use 2: use fewer ranks, or set VLLM_CPU_OMP_THREADS_BIND yourself")
    assert engine.engines_created == created and engine_children() == pids
    assert "Paris" in engine.generate("What is the capital of France?", temperature=0, max_tokens=16).text
