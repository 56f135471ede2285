"""Interrupts and crashes as a user causes them, in real kernels started by jupyter_client.

The interrupt is the kernel manager's ``interrupt_kernel()``: what JupyterLab's ■ sends, SIGINT to the
kernel's whole process group. The engine must shrug it off (only the request stops), an interrupted
load must leave nothing half-started, and a kernel killed with SIGKILL must take its engine with it.
"""

from __future__ import annotations

import os
import re
import signal

import psutil
import pytest

from real_kernel import RealKernel

# Over the suite's 15 min default: real kernels that each load an engine; the first test interrupts ten
# 1500-token answers.
pytestmark = pytest.mark.timeout(1800)

LONG = "%%vllm -m 1500 -t 0.8\nWrite a very long story about a dragon who learns to cook."
GREEDY = "%%vllm -t 0 -m 24 --quiet\nWhat is the capital of France?"


def _streaming(text: str) -> bool:
    """A display update of an answer that is streaming and already has some words."""
    return text.endswith(" ▌") and len(text.split()) >= 4


def _answer_of(run) -> str:
    """The text of the VllmResult repr in the cell's value: VllmResult('...', tokens=...)."""
    match = re.search(r"VllmResult\('(.*)', tokens=", run.text, re.S)
    assert match, f"no result in the cell's output: {run.text!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    kernel = RealKernel(tmp_path_factory.mktemp("kernel"))
    kernel.ok("%load_ext vllm_magic\n%config VllmMagics.show_controls = False")
    yield kernel
    kernel.shutdown()


def test_ten_interrupts_during_generation_abort_requests_and_keep_the_engine(kernel):
    kernel.ok("%vllm_load")
    before = _answer_of(kernel.execute(GREEDY))
    assert "Paris" in before
    engine = kernel.engine_pids()
    assert engine, "the engine started no processes"
    for _ in range(10):
        msg_id = kernel.start(LONG)
        kernel.wait_for_output(msg_id, _streaming)
        kernel.interrupt()
        run = kernel.wait(msg_id)
        assert run.error is not None and run.error[0] == "UsageError", run.error
        assert run.error[1].startswith("interrupted: the request was aborted in the engine"), run.error
        stats = [t for t in run.final if "⏹ interrupted" in t]
        assert len(stats) == 1, f"no 'interrupted' stats line: {run.final}"
        partial = run.final[0]
        assert len(partial.split()) >= 3 and "▌" not in partial, f"the partial answer is not shown: {run.final}"
        assert kernel.engine_pids() == engine, "an engine process died or was replaced"
    after = kernel.execute(GREEDY)
    assert after.error is None, after.error
    assert _answer_of(after) == before
    status = kernel.ok("s = %vllm_status\nprint(s.loaded, s.dead, s.requests_live)")
    assert status.strip() == "True None 0"


def test_interrupt_during_load_leaves_no_engine_then_loading_works(kernel):
    kernel.ok("%vllm_unload")
    assert not kernel.engine_pids()
    msg_id = kernel.start("%vllm_load")
    # The load's own progress line (updated every second) drives the check: the engine core is starting.
    kernel.wait_for_output(msg_id, lambda _line: len(kernel.engine_pids()) >= 1)
    kernel.interrupt()
    run = kernel.wait(msg_id)
    assert run.error == ("UsageError", "loading interrupted; no engine is loaded (run %vllm_load again)")
    # The interrupt stopped the start itself: vLLM did not wait out its engine-ready timeout first.
    assert "Timed out waiting for engine core" not in kernel.ok("%vllm_log -n 5000")
    assert not kernel.engine_pids(), "a half-started engine was left behind"
    assert kernel.ok("print(get_ipython().run_line_magic('vllm_status', '').loaded)").strip() == "False"
    assert "loaded on" in kernel.ok("%vllm_load")
    assert "Paris" in _answer_of(kernel.execute(GREEDY))


def _described(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return str(proc.pid)


def test_sigkill_of_the_kernel_leaves_no_engine_process(tmp_path):
    kernel = RealKernel(tmp_path)
    try:
        kernel.ok("%load_ext vllm_magic\n%vllm_load --no-controls")
        # The engine's processes, and multiprocessing's resource tracker where the platform starts one
        # (the CPU build's spawned engine does; a GPU engine may not).
        processes = kernel.processes()
        assert kernel.engine_pids(), [_described(p) for p in processes]
        os.kill(kernel.pid, signal.SIGKILL)
        # Nothing is signalled by the test: the processes must notice that their kernel is gone.
        _, alive = psutil.wait_procs(processes, timeout=120)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"processes outlived their kernel: {[_described(p) for p in alive]}"
    finally:
        if psutil.pid_exists(kernel.pid):  # the test failed before its kill: end the kernel and its engine
            for proc in kernel.processes():
                proc.kill()
            os.kill(kernel.pid, signal.SIGKILL)
        kernel.kc.stop_channels()
        kernel.km.cleanup_resources()


def test_vllm_prints_nothing_into_cells_on_first_import_and_engine_start(tmp_path):
    kernel = RealKernel(tmp_path)
    try:
        # The first use of vLLM in the kernel is a LangChain construction, as in a user's notebook.
        run = kernel.execute('from vllm_magic.langchain import VLLM\n'
                             'llm = VLLM(model="SmolLM2-135M-Instruct", max_new_tokens=16, temperature=0)\n'
                             'print(llm.invoke("What is the capital of France?"))')
        assert run.error is None, run.error
        assert run.stderr == [], f"vLLM printed into the cell: {run.stderr}"
        assert "Paris" in run.text
        # Another engine starting (a new configuration) prints only the summary line.
        run = kernel.execute("%load_ext vllm_magic\n%vllm_load --no-controls --max-model-len 1024")
        assert run.error is None and run.stderr == [], (run.error, run.stderr)
        assert run.final == [run.final[0]] and run.final[0].startswith("✓ SmolLM2-135M-Instruct loaded on "), run.final
    finally:
        kernel.shutdown()
