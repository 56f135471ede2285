"""The registry of persisted engines as pure logic: records, leases, dead engines, the private directory.

No engine runs here: a record names a process (this test's own, or one that has exited), which is all
the registry looks at. ``tests/test_persisted_kernels.py`` runs real engines in real kernels.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from vllm_magic.engine.backends import persisted
from vllm_magic.engine.backends.persisted_process import live_leases
from vllm_magic.engine.config import EngineConfig
from vllm_magic.engine.flags import FlagError, format_duration, parse_duration
from vllm_magic.paths import runtime_dir

CONFIG = EngineConfig(model="/models/demo", engine_kwargs={"max_model_len": 1024}, platform="cpu",
                      requested={"max_model_len": 1024})
OTHER = EngineConfig(model="/models/other", engine_kwargs={}, platform="cpu")


@pytest.fixture
def runtime(monkeypatch):
    path = Path(tempfile.mkdtemp(prefix="vmrt-"))
    os.rmdir(path)  # runtime_dir() creates it
    monkeypatch.setenv("VLLM_MAGIC_RUNTIME", str(path))
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _exited_process() -> tuple[int, float]:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    created = psutil.Process(child.pid).create_time()
    child.wait(timeout=60)
    return child.pid, created


def _record(root: Path, name: str, config: EngineConfig, pid: int, created: float) -> persisted.PersistedEngine:
    directory = root / name
    (directory / "kernels").mkdir(parents=True)
    engine = persisted.PersistedEngine(directory=directory, pid=pid, create_time=created, config=config,
                                       url=f"unix:{directory}/engine.sock", model_name="demo",
                                       log_path=str(root / f"{name}.log"))
    engine.write()
    return engine


def test_durations_read_as_flags_and_written_as_status_lines():
    assert parse_duration("90s") == 90 and parse_duration("15m") == 900 and parse_duration("2h") == 7200
    assert parse_duration("5") == 300  # a bare number is minutes
    assert parse_duration("never") is None
    for bad in ("soon", "0", "-3m"):
        with pytest.raises(FlagError, match="idle-timeout"):
            parse_duration(bad)
    assert (format_duration(42), format_duration(900), format_duration(9000)) == ("42 s", "15 min", "2.5 h")


def test_runtime_directory_is_created_private_and_closed_when_found_open(runtime):
    assert runtime_dir() == runtime
    assert stat.S_IMODE(os.stat(runtime).st_mode) == 0o700
    os.chmod(runtime, 0o755)
    runtime_dir()
    assert stat.S_IMODE(os.stat(runtime).st_mode) == 0o700


def test_runtime_directory_of_another_user_is_refused(runtime):
    runtime.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(runtime, 65534, 65534)  # nobody's: whoever owns it could read the keys in it
        with pytest.raises(PermissionError, match="not a directory of this user"):
            runtime_dir()
    else:  # only root can give a directory away; a file in its place is refused the same way
        runtime.rmdir()
        runtime.write_text("")
        with pytest.raises((PermissionError, FileExistsError)):
            runtime_dir()


def test_record_round_trips_and_a_live_engine_that_serves_is_found(runtime):
    me = psutil.Process()
    engine = _record(runtime_dir(), "aaaa0001", CONFIG, me.pid, me.create_time())
    _record(runtime, "aaaa0002", OTHER, me.pid, me.create_time())
    assert persisted.PersistedEngine.read(engine.directory) == engine
    with persisted.registry_lock():
        found, note = persisted.find(CONFIG)
    assert found == engine and note is None
    assert [e.id for e in persisted.engines()] == ["aaaa0001", "aaaa0002"]


def test_a_dead_engine_is_reported_once_and_everything_it_left_is_removed(runtime):
    pid, created = _exited_process()
    dead = _record(runtime_dir(), "bbbb0001", CONFIG, pid, created)
    (dead.directory / "engine.sock").write_text("")  # a stale socket and key
    (dead.directory / "key").write_text("secret")
    abandoned = runtime / "bbbb0002"
    (abandoned / "kernels").mkdir(parents=True)  # a start that never wrote its record
    with persisted.registry_lock():
        found, note = persisted.find(CONFIG)
    assert found is None
    assert note is not None and "had ended without being stopped" in note and str(pid) in note
    assert not dead.directory.exists() and not abandoned.exists()
    with persisted.registry_lock():
        assert persisted.find(CONFIG) == (None, None)


def test_a_dead_engine_of_another_configuration_is_removed_without_a_word(runtime):
    pid, created = _exited_process()
    dead = _record(runtime_dir(), "cccc0001", OTHER, pid, created)
    with persisted.registry_lock():
        assert persisted.find(CONFIG) == (None, None)
    assert not dead.directory.exists()


def test_a_pid_reused_by_another_process_is_not_the_engine(runtime):
    me = psutil.Process()
    engine = _record(runtime_dir(), "dddd0001", CONFIG, me.pid, me.create_time() - 100.0)
    assert not engine.alive


def test_leases_of_this_process_and_of_exited_ones(runtime):
    me = psutil.Process()
    engine = _record(runtime_dir(), "eeee0001", CONFIG, me.pid, me.create_time())
    engine.lease()
    pid, created = _exited_process()
    gone = engine.directory / "kernels" / str(pid)
    gone.write_text(json.dumps({"pid": pid, "create_time": created, "kernel": None, "since": 0}))
    assert [lease["pid"] for lease in live_leases(engine.directory)] == [os.getpid()]
    assert not gone.exists()  # a kernel that is gone is no longer attached
    assert "kernels attached: this kernel" in engine.describe()
    engine.release()
    assert engine.kernels() == []
    assert "kernels attached: none" in engine.describe()
