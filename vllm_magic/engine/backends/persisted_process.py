"""The process of an engine that outlives its kernel (``%vllm_load MODEL --persist``).

``python -m vllm_magic.engine.backends.persisted_process DIR ARGS...`` runs vLLM's API server with
ARGS (``vllm serve`` flags) in this process, the leader of a session of its own that no kernel owns.
DIR is the engine's private directory (:mod:`.persisted` says what is in it). A watchdog thread reads
it once a second:

* ``kernels/`` holds one lease per attached kernel; a lease whose kernel is gone (exited, restarted,
  SIGKILLed) is removed;
* with no live lease and no request running or finished for the idle timeout (``engine.json``'s
  ``idle_timeout``, re-read each time, so a later attach may change it), the engine ends;
* when DIR itself is gone (``%vllm_unload --stop`` removes it first), the engine ends.

Ending is SIGTERM to this process (vLLM's server stops its engine on it), then SIGKILL to whatever
of the group is left a few seconds later; the directory is removed, so nothing of the engine remains.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .processes import kill_group_later

#: Seconds between two looks at the engine's directory.
POLL = 1.0
#: Seconds vLLM's server gets to stop after SIGTERM before the group is killed.
STOP_GRACE = 15.0


def main(argv: list[str]) -> None:
    directory, args = Path(argv[0]), argv[1:]
    threading.Thread(target=watch, args=(directory,), name="vllm-magic-idle-watch", daemon=True).start()
    sys.argv = ["vllm serve", *args]
    try:
        runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        _kill_rest_of_group()


def _kill_rest_of_group() -> None:
    """The server has returned: whatever of its group is still running (an engine core that did not
    stop) goes too."""
    import psutil

    me, group = os.getpid(), os.getpgid(0)
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.pid != me and os.getpgid(proc.pid) == group:
                proc.kill()


def watch(directory: Path) -> None:
    """End this engine when its directory is removed, or when it was idle for its timeout."""
    last_active = time.monotonic()
    activity: Any = None
    while True:
        time.sleep(POLL)
        if not directory.exists():
            return end(directory)
        if live_leases(directory):
            last_active = time.monotonic()
            continue
        now_activity = _requests_seen(directory)
        if now_activity is not None and (now_activity != activity or now_activity[0] > 0):
            activity, last_active = now_activity, time.monotonic()
            continue
        timeout = _idle_timeout(directory)
        if timeout is not None and time.monotonic() - last_active >= timeout:
            return end(directory)


def end(directory: Path) -> None:
    """SIGTERM to this process, SIGKILL to its group after :data:`STOP_GRACE`; the directory goes."""
    shutil.rmtree(directory, ignore_errors=True)  # a kernel looking now no longer finds it
    kill_group_later(os.getpgid(0), STOP_GRACE)  # also when this process exits sooner (see processes)
    with contextlib.suppress(OSError):
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE)
    with contextlib.suppress(OSError):
        os.killpg(os.getpgid(0), signal.SIGKILL)


def live_leases(directory: Path) -> list[dict[str, Any]]:
    """The leases of the kernels attached now; those of kernels that are gone are removed."""
    found = []
    try:
        entries = list((directory / "kernels").iterdir())
    except OSError:
        return found
    for path in entries:
        try:
            lease = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written: the next look reads it
        if process_alive(int(lease.get("pid", 0)), lease.get("create_time")):
            found.append(lease)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return found


def process_alive(pid: int, create_time: float | None) -> bool:
    """Whether process ``pid`` runs and is the one that started at ``create_time`` (not a reuse)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - float(create_time)) < 0.05
    except (psutil.Error, ValueError):
        return False


def _idle_timeout(directory: Path) -> float | None:
    try:
        value = json.loads((directory / "engine.json").read_text()).get("idle_timeout")
    except (OSError, ValueError):
        return None  # not written yet, or being replaced: wait for the next look
    return None if value is None else float(value)


def _requests_seen(directory: Path) -> tuple[float, float] | None:
    """(requests running or waiting, requests finished so far) from the server's metrics, or None."""
    try:
        record = json.loads((directory / "engine.json").read_text())
        with http_client(record["url"], timeout=2.0) as client:
            text = client.get("/metrics").text
    except Exception:  # noqa: BLE001 - starting, or no metrics: only the leases count then
        return None
    live = done = 0.0
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            live += _value(line)
        elif name == "vllm:request_success_total":
            done += _value(line)
    return live, done


def http_client(url: str, **kwargs: Any) -> Any:
    """An ``httpx`` client for ``url``: ``http://host:port`` or ``unix:/path/to/socket``."""
    import httpx

    if url.startswith("unix:"):
        return httpx.Client(transport=httpx.HTTPTransport(uds=url[5:]), base_url="http://localhost", **kwargs)
    return httpx.Client(base_url=url, **kwargs)


def _value(line: str) -> float:
    try:
        return float(line.rsplit(" ", 1)[1])
    except (IndexError, ValueError):
        return 0.0


if __name__ == "__main__":
    main(sys.argv[1:])
