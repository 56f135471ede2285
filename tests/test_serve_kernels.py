"""``%vllm_serve`` in real kernels started by jupyter_client: the server lives and dies with its kernel.

The interrupt is the kernel manager's ``interrupt_kernel()`` (JupyterLab's ■: SIGINT to the kernel's
process group); a crash is SIGKILL. The server's processes must shrug off the interrupt (only the
request stops, aborted by the server) and must not outlive their kernel either way.
"""

from __future__ import annotations

import os
import re
import signal

import psutil
import pytest

from polling import until as _until
from real_kernel import RealKernel
from test_kernel_interrupts import GREEDY, LONG, _answer_of, _streaming
from test_remote import _running_on

# Over the suite's 15 min default: real kernels that load an engine and start a vLLM server: two engine
# starts per test.
pytestmark = pytest.mark.timeout(1800)


def _server_processes(kernel: RealKernel) -> list[psutil.Process]:
    """The server's process group: the server that the kernel started and everything vLLM started for it."""
    pgid = int(kernel.ok("print(get_ipython().user_ns['_vm'].session.server.process.pid)").strip())
    group = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                group.append(proc)
        except (OSError, psutil.Error):
            pass
    return group


def _left(processes: list[psutil.Process]) -> list[tuple[int, str]]:
    alive = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append((proc.pid, proc.name()))
        except psutil.NoSuchProcess:
            pass
    return alive


SETUP = ("%load_ext vllm_magic\n%config VllmMagics.show_controls = False\n"
         "from vllm_magic.magics import VllmMagics\n"
         "_vm = next(c for c in get_ipython().configurables if isinstance(c, VllmMagics))")


def test_handoff_serves_the_loaded_engine_and_interrupts_abort_on_the_server(tmp_path):
    kernel = RealKernel(tmp_path)
    server = []
    try:
        kernel.ok(SETUP)
        kernel.ok("%vllm_load")
        before = _answer_of(kernel.execute(GREEDY))
        in_process = kernel.engine_pids()
        out = kernel.ok("%vllm_serve --handoff --port 0")
        assert "now uses it" in out, out
        url = re.search(r"served at (http://[\d.:]+)/v1", out).group(1)
        server = _server_processes(kernel)
        assert len(server) >= 2  # vLLM's server and its engine core
        assert not _left([psutil.Process(pid) for pid in in_process if psutil.pid_exists(pid)]), \
            "the in-process engine was not unloaded: two copies of the model"
        assert _answer_of(kernel.execute(GREEDY)) == before  # the same engine configuration answers
        for _ in range(3):
            msg_id = kernel.start(LONG)
            kernel.wait_for_output(msg_id, _streaming)
            kernel.interrupt()
            run = kernel.wait(msg_id)
            assert run.error is not None and run.error[1].startswith("interrupted"), run.error
            assert any("⏹ interrupted" in t for t in run.final), run.final
            _until(lambda: _running_on(url) == 0)  # the server aborted the request
            assert len(_left(server)) == len(server), "the interrupt reached the server's processes"
        assert _answer_of(kernel.execute(GREEDY)) == before
        status = kernel.ok("s = %vllm_status\nprint(s.platform, s.server == " + repr(url) + ", s.requests_live)")
        assert status.strip() == "remote True 0"
    finally:
        kernel.shutdown()
    # The kernel shut down: its server stopped with it.
    _until(lambda: not _left(server), timeout=60)


def test_sigkill_of_the_kernel_leaves_no_server_process(tmp_path):
    kernel = RealKernel(tmp_path)
    try:
        kernel.ok(SETUP)
        assert "served at" in kernel.ok("%vllm_serve --port 0")
        server = _server_processes(kernel)
        assert len(server) >= 2
        os.kill(kernel.pid, signal.SIGKILL)
        # Nothing is signalled by the test: the server must notice that its kernel is gone.
        _until(lambda: not _left(server), timeout=120)
    finally:
        kernel.kc.stop_channels()
        kernel.km.cleanup_resources()
