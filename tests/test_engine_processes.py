"""Engine processes end with their kernel, everything they started included (no engine, no vLLM: a
stand-in process tree, killed as a crashed kernel is)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

PROJECT = Path(__file__).resolve().parents[1]

#: A stand-in kernel: it starts a guarded "engine" process (as vLLM's LLM does), which starts a worker
#: of its own that ignores SIGTERM and never looks at its parent (as torch's compile workers do, which
#: notice a dead parent only once a minute); the engine exits at once on SIGTERM, as vLLM's does.
KERNEL = '''
import multiprocessing, signal, subprocess, sys, time
from vllm_magic.engine.backends.processes import engine_processes_guarded

WORKER = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"


def engine(ready):
    worker = subprocess.Popen([sys.executable, "-c", WORKER])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ready.put(worker.pid)
    time.sleep(600)


if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    with engine_processes_guarded():
        process = context.Process(target=engine, args=(ready,))
        process.start()
    print(process.pid, ready.get(), flush=True)
    time.sleep(600)
'''


def _running(procs: list[psutil.Process]) -> list[int]:
    alive = []
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except psutil.Error:
            continue
    return alive


def test_a_killed_kernel_takes_the_engine_and_what_the_engine_started_with_it(tmp_path):
    script = tmp_path / "kernel.py"
    script.write_text(KERNEL)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])))
    kernel = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    procs: list[psutil.Process] = []
    try:
        engine_pid, worker_pid = map(int, kernel.stdout.readline().split())
        procs = [psutil.Process(engine_pid), psutil.Process(worker_pid)]
        kernel.send_signal(signal.SIGKILL)
        kernel.wait(timeout=60)
        psutil.wait_procs(procs, timeout=60)
        assert not _running(procs), "processes outlived their kernel"
    finally:
        # only what this test started: the suite's own engine runs beside it
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        kernel.kill()
        kernel.wait(timeout=60)
