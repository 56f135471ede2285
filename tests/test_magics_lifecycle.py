"""Loading, status, log, engine death and unloading through the magics, on an engine of their own.

These tests start (and kill) a second demo-model engine in a session of their own, so the engine
that the other tests share is never disturbed.
"""

from __future__ import annotations

import psutil
import pytest
from IPython.core.error import UsageError

import vllm_magic
from ipython_capture import make_shell
from vllm_magic.magics import VllmMagics, register
from vllm_magic.engine.session import EngineSession

# Over the suite's 15 min default: engine starts and switches of a session of its own.
pytestmark = pytest.mark.timeout(1800)

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def own():
    session = EngineSession()
    yield session
    session.unload()


@pytest.fixture(scope="module")
def shell(own):
    ip, publisher = make_shell()
    register(ip, session=own)
    yield ip, publisher
    from vllm_magic.magics import unregister

    unregister(ip)
    type(ip).clear_instance()


def _load(ip, capsys) -> None:
    """The engine the tests below work on (already there: returns at once)."""
    ip.run_line_magic("vllm_load", "--no-controls --max-model-len 1024")
    capsys.readouterr()


def test_load_shows_progress_then_a_summary_and_a_reload_reuses_the_engine(shell, own, capsys):
    ip, pub = shell
    register(ip, session=own)
    own.unload()  # a load that starts an engine, whatever ran before
    pub.clear()
    ip.run_line_magic("vllm_load", "--no-controls --max-model-len 1024")
    progress = pub.updates()
    assert progress and all(c["display_id"] == progress[0]["display_id"] for c in progress)
    assert any(c["data"]["text/plain"].startswith("⏳ ") and c["data"]["text/plain"].endswith(" s")
               for c in progress)
    assert pub.outputs()[0] == {"text/plain": ""} and progress[-1]["data"] == {"text/plain": ""}
    summary = capsys.readouterr().out
    assert summary.startswith("✓ SmolLM2-135M-Instruct loaded on ") and "KV cache" in summary
    assert own.status().max_model_len == 1024

    created = own.engines_created
    ip.run_line_magic("vllm_load", "--max-model-len 1024")
    assert "already loaded" in capsys.readouterr().out and own.engines_created == created


def test_status_and_log_report_the_engine_and_its_log(shell, own, capsys):
    ip, _ = shell
    register(ip, session=own)
    _load(ip, capsys)
    status = ip.run_line_magic("vllm_status", "")
    assert status.loaded and status.max_model_len == 1024
    assert "| model |" in status._repr_markdown_()
    ip.run_line_magic("vllm_log", "-n 5")
    tail = capsys.readouterr().out.splitlines()
    assert 0 < len(tail) <= 5
    ip.run_line_magic("vllm_log", "--path")
    assert capsys.readouterr().out.strip() == str(own.log.path)
    with pytest.raises(UsageError, match="invalid int value"):
        ip.run_line_magic("vllm_log", "-n many")


def test_dead_engine_says_how_to_reload_and_a_reload_answers(shell, own, capsys):
    ip, _ = shell
    register(ip, session=own)
    _load(ip, capsys)
    assert "Paris" in ip.run_cell_magic("vllm", "-t 0 -m 24 --quiet", QUESTION).text
    created = own.engines_created
    # Kill this session's engine only: the engine the other test modules share must live on.
    procs = [psutil.Process(pid) for pid in own.backend.children]
    assert procs
    for proc in procs:
        proc.kill()
    psutil.wait_procs(procs, timeout=30)
    with pytest.raises(UsageError, match=r"engine .*died.*%vllm_load"):
        ip.run_cell_magic("vllm", "-t 0 -m 24 --quiet", QUESTION)
    ip.run_line_magic("vllm_load", "--max-model-len 1024")
    assert "loaded on" in capsys.readouterr().out and own.engines_created == created + 1
    assert "Paris" in ip.run_cell_magic("vllm", "-t 0 -m 24 --quiet", QUESTION).text


def test_unloading_the_extension_removes_the_magics_and_stops_the_engine(shell, own, capsys):
    ip, _ = shell
    register(ip, session=own)
    _load(ip, capsys)
    assert own.loaded and ip.find_cell_magic("vllm") is not None
    vllm_magic.unload_ipython_extension(ip)
    assert not own.loaded
    assert ip.find_cell_magic("vllm") is None and ip.find_line_magic("vllm_load") is None
    assert not any(isinstance(c, VllmMagics) for c in ip.configurables)


def test_without_a_model_the_magics_say_what_to_run_and_unload_frees(shell, own, capsys):
    ip, _ = shell
    register(ip, session=own)
    own.unload()  # no model, whatever ran before
    ip.run_line_magic("vllm_unload", "")
    assert "no model is loaded" in capsys.readouterr().out
    with pytest.raises(UsageError, match="no model is loaded: run %vllm_load"):
        ip.run_cell_magic("vllm", "-t 0", QUESTION)
    ip.run_line_magic("vllm_load", "--max-model-len 1024")
    assert "Paris" in ip.run_cell_magic("vllm", "-t 0 -m 24 --quiet", QUESTION).text
    capsys.readouterr()
    ip.run_line_magic("vllm_unload", "")
    assert capsys.readouterr().out.startswith("unloaded ") and not own.loaded
