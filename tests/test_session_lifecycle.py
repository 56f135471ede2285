"""Loading, switching and unloading engines: nothing is left behind, bad configs never cost the engine."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import psutil
import pytest

import demo_engine
from child_processes import engine_children
from vllm_magic.engine.config import ConfigError
from vllm_magic.engine.flags import load_flags
from vllm_magic.engine.session import EngineStartError


def _answers(session) -> str:
    return session.generate("What is the capital of France?", temperature=0, max_tokens=16).text


def test_invalid_configurations_are_refused_before_the_engine_is_touched(engine, tmp_path):
    created, pids = engine.engines_created, engine_children()
    with pytest.raises(ConfigError, match="no such model directory"):
        engine.load(str(tmp_path / "missing-model"))
    with pytest.raises(ConfigError, match="unknown engine argument"):
        engine.load(max_modle_len=1024)
    with pytest.raises(ConfigError):  # longer than the model's 8192 positions: vLLM's own check
        engine.load(max_model_len=10_000_000)
    with pytest.raises(ConfigError, match="unrecognized engine arguments"):
        load_flags("--max-modle-len 1024")
    with pytest.raises(ConfigError, match="invalid"):
        load_flags("--max-model-len lots")
    assert engine.engines_created == created
    assert engine_children() == pids, "the running engine was restarted or lost"
    assert "Paris" in _answers(engine)


@pytest.mark.timeout(1800)  # two engine starts: the switch, then the demo engine again
def test_switching_leaves_no_engine_process_behind(engine):
    default = engine.config
    first = engine_children()
    assert first
    try:
        info = engine.load(max_model_len=2048)
        assert not info.already_loaded
        assert engine.status().max_model_len == 2048
        assert not (first & engine_children()), "processes of the first engine survived the switch"
        assert engine.last_unload.processes_killed == 0
        second = engine_children()
        assert "Paris" in _answers(engine)
    finally:
        demo_engine.restore(engine)  # the default configuration again, whatever failed above
    assert engine.config == default and engine.config.requested == {}
    assert not (second & engine_children()), "processes of the second engine survived the switch"
    assert "Paris" in _answers(engine)


def test_a_failed_start_reports_the_cause_and_leaves_the_session_empty(engine, tmp_path):
    bogus = tmp_path / "not-a-model"
    bogus.mkdir()
    (bogus / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["NoSuchModelForCausalLM"]}))
    before = engine_children()
    engine.unload()
    assert not engine.loaded and not engine_children() & before
    try:
        with pytest.raises((EngineStartError, ConfigError)) as excinfo:
            engine.load(str(bogus))
        message = str(excinfo.value)
        assert "NoSuchModelForCausalLM" in message, message  # the cause, in a few lines
        assert len(message.splitlines()) <= 8
        assert not engine.loaded
        assert not engine_children() - before, "a failed start left processes behind"
    finally:
        demo_engine.restore(engine)
    assert "Paris" in _answers(engine)


def test_unload_is_safe_twice_and_a_process_exit_leaves_no_orphans(tmp_path):
    script = textwrap.dedent("""
        import json, psutil
        from vllm_magic import get_session

        def engine_pids():
            # multiprocessing's resource tracker is not the engine's: it ends on its own once we exit
            return [p.pid for p in psutil.Process().children(recursive=True)
                    if "resource_tracker" not in " ".join(p.cmdline())]

        def running(pid):
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        if __name__ == "__main__":
            session = get_session()
            session.load()
            unloaded = engine_pids()
            first, second = session.unload(), session.unload()
            left = [pid for pid in unloaded if running(pid)]
            session.load()
            print(json.dumps({"first": first, "second": second, "unloaded": unloaded, "left": left,
                              "pids": engine_pids()}), flush=True)
            # exit without unload(): the session's exit hook must stop the engine
    """)
    path = tmp_path / "unload_twice_then_exit_without_unload.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["first"] is True and report["second"] is False, "the second unload() found an engine"
    assert report["unloaded"], "the first engine started no processes?"
    assert not report["left"], f"processes of the unloaded engine survived unload(): {report['left']}"
    pids = report["pids"]
    assert pids, "the engine started no processes?"
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    alive = [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"engine processes outlived their kernel: {alive}"
