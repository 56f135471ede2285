"""Engines that outlive their kernel (``%vllm_load --persist``), in real kernels started by jupyter_client.

A restart is the kernel manager's ``restart_kernel()``, a crash a SIGKILL, as a user causes them. Each
test has a runtime directory of its own (``$VLLM_MAGIC_RUNTIME``, inherited by its kernels), so it
sees only the engines it started; whatever a test leaves is ended in its teardown.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import tempfile
from pathlib import Path

import psutil
import pytest

from polling import until
from real_kernel import RealKernel
from vllm_magic.engine.backends import persisted

# Over the suite's 15 min default: each test starts engines in a server process of their own and kernels.
pytestmark = pytest.mark.timeout(1800)

README = Path(__file__).resolve().parent.parent / "README.md"
GREEDY = "%%vllm -t 0 -m 24 --quiet\nWhat is the capital of France?"
SETUP = "%load_ext vllm_magic\n%config VllmMagics.show_controls = False"

#: 200 requests submitted at once from one kernel, each constrained to a text of its own, so that an
#: answer given to the wrong request (or kernel) shows; prints how many came back right and finished.
CONCURRENT = """
from vllm_magic import get_session
_handles = [get_session().submit("Say the code.", regex="{tag}-" + str(i), temperature=0, max_tokens=12)[0]
            for i in range(200)]
_results = [h.result(timeout=900) for h in _handles]
print("right", sum(r.text == "{tag}-" + str(i) for i, r in enumerate(_results)),
      "finished", sum(r.finish_reason in ("stop", "length") for r in _results))
"""


@pytest.fixture
def runtime(monkeypatch):
    """A private runtime directory for this test's persisted engines (short: it holds Unix sockets)."""
    path = Path(tempfile.mkdtemp(prefix="vmrt-"))
    monkeypatch.setenv("VLLM_MAGIC_RUNTIME", str(path))
    yield path
    for engine in persisted.engines(path):
        engine.stop()
    shutil.rmtree(path, ignore_errors=True)


def _readme_blocks() -> list[str]:
    """The README's persisted-engine cells: load, the same load after a restart, stop."""
    text = README.read_text()
    start, end = text.index("<!-- section: persist -->"), text.index("<!-- section: scaling -->")
    return [block.strip() for block in re.findall(r"```ipython\n(.*?)```", text[start:end], flags=re.S)]


def _answer_of(run) -> str:
    match = re.search(r"VllmResult\('(.*)', tokens=", run.text, re.S)
    assert match, f"no result in the cell's output: {run.text!r}"
    return match.group(1)


def _only_engine(root: Path) -> persisted.PersistedEngine:
    running = persisted.engines(root)
    assert len(running) == 1, f"expected one persisted engine, found {running}"
    return running[0]


def _successes(engine: persisted.PersistedEngine) -> float:
    with persisted.http_client(engine.url, timeout=10) as client:
        text = client.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


def _gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in pids)


def _connect_as_nobody(socket_path: str) -> str:
    """Try to connect to ``socket_path`` as the user nobody (a forked child that drops root)."""
    child = os.fork()
    if child == 0:  # the child: nothing but the attempt, then out without running any cleanup
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(socket_path)
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    return {0: "connected", 13: "refused"}.get(os.waitstatus_to_exitcode(status), "failed")


def test_persisted_engine_survives_restart_serves_two_kernels_and_stop_ends_it(tmp_path, runtime):
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    load, load_again, stop = _readme_blocks()  # the README's cells, run as written
    first = RealKernel(tmp_path / "first")
    second = None
    try:
        first.ok(SETUP)
        assert "in a persisted engine" in first.ok(load)
        engine = _only_engine(runtime)
        pids = sorted(p.pid for p in engine.processes())
        answer = _answer_of(first.execute(GREEDY))

        first.km.restart_kernel(now=False)
        first.kc.wait_for_ready(timeout=120)
        first.ok(SETUP)
        loaded = first.ok(load_again)
        assert "attached to the persisted engine" in loaded, loaded
        assert sorted(p.pid for p in _only_engine(runtime).processes()) == pids  # no new engine process
        assert _answer_of(first.execute(GREEDY)) == answer
        assert "kernels attached: this kernel" in first.ok("print(repr(get_ipython().run_line_magic("
                                                            "'vllm_status', '')._repr_markdown_()))")

        second = RealKernel(tmp_path / "second")
        second.ok(SETUP)
        assert "attached to the persisted engine" in second.ok("%vllm_load")  # no --persist: the running one serves
        before = _successes(engine)
        runs = [first.start(CONCURRENT.replace("{tag}", "first")), second.start(CONCURRENT.replace("{tag}", "second"))]
        outputs = [first.wait(runs[0]), second.wait(runs[1])]
        for run in outputs:
            assert run.error is None, run.error
            assert "right 200 finished 200" in run.text, run.text
        assert _successes(engine) - before == 400  # one engine served both kernels

        os.kill(second.pid, signal.SIGKILL)  # a kernel killed while attached does not stop the engine
        assert _answer_of(first.execute(GREEDY)) == answer
        until(lambda: len(engine.kernels()) == 1, timeout=60, what="the killed kernel's lease to go")

        stopped = first.ok(stop)
        assert "ended the persisted engine" in stopped, stopped
        assert _gone(pids)
        assert not any(p.is_dir() for p in runtime.iterdir()), list(runtime.iterdir())
    finally:
        first.shutdown()
        if second is not None and second.km.is_alive():
            second.shutdown()
        elif second is not None:
            second.kc.stop_channels()
            second.km.cleanup_resources()


def test_persisted_engine_is_private_replaced_when_killed_and_ends_when_idle(tmp_path, runtime):
    kernel = RealKernel(tmp_path)
    try:
        kernel.ok(SETUP)
        kernel.ok("%vllm_load --persist")
        engine = _only_engine(runtime)
        assert stat.S_IMODE(os.stat(runtime).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(engine.directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(engine.directory / "key").st_mode) == 0o600
        body = {"model": engine.model_name, "prompt": "Hi", "max_tokens": 2}
        with persisted.http_client(engine.url, timeout=30) as client:
            assert client.post("/v1/completions", json=body).status_code == 401  # no key
            keyed = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {engine.api_key}"})
            assert keyed.status_code == 200
        if engine.url.startswith("unix:") and os.geteuid() == 0:
            # Another local user (nobody) cannot even connect: the socket's directory is closed to them.
            assert _connect_as_nobody(engine.url[5:]) == "refused"

        old = sorted(p.pid for p in engine.processes())
        os.killpg(engine.pid, signal.SIGKILL)
        until(lambda: _gone(old), timeout=60, what="the killed engine's processes to end")
        replaced = kernel.ok("%vllm_load --persist --idle-timeout 1s")
        assert "had ended without being stopped" in replaced and "in a persisted engine" in replaced, replaced
        assert "Paris" in _answer_of(kernel.execute(GREEDY))
        engine = _only_engine(runtime)
        pids = sorted(p.pid for p in engine.processes())
        assert not set(pids) & set(old)

        detached = kernel.ok("%vllm_unload")
        assert "detached from the persisted engine" in detached, detached
        until(lambda: _gone(pids) and not any(p.is_dir() for p in runtime.iterdir()), timeout=120,
              what="the idle engine to end and its directory to go")
    finally:
        kernel.shutdown()


def test_persisted_server_serves_outside_clients_outlives_a_restart_and_stops_on_request(tmp_path, runtime):
    import httpx

    kernel = RealKernel(tmp_path)
    try:
        kernel.ok(SETUP)
        served = kernel.ok("%vllm_serve --persist --port 0")
        assert "by a persisted engine: it outlives this kernel" in served, served
        engine = _only_engine(runtime)
        assert engine.served and engine.url.startswith("http://127.0.0.1:")
        pids = sorted(p.pid for p in engine.processes())
        body = {"model": engine.model_name, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
        with httpx.Client(base_url=engine.url, timeout=60) as client:  # an outside client, as curl would be
            answer = client.post("/v1/completions", json=body)
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"].strip()

        kernel.km.restart_kernel(now=False)
        kernel.kc.wait_for_ready(timeout=120)
        kernel.ok(SETUP)
        again = kernel.ok("%vllm_serve --persist --port 0")
        assert f"already served at {engine.base_url} by a persisted engine" in again, again
        assert sorted(p.pid for p in _only_engine(runtime).processes()) == pids

        stopped = kernel.ok("%vllm_serve --stop")
        assert "stopped the server at" in stopped, stopped
        assert _gone(pids)
        assert not any(p.is_dir() for p in runtime.iterdir())
    finally:
        kernel.shutdown()
