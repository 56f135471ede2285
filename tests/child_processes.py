"""The engine processes a test process started, for checks that nothing of an old engine survives."""

from __future__ import annotations

import psutil


def engine_children() -> set[int]:
    """Live child processes except multiprocessing's resource tracker (an exited child that is not
    reaped yet, a zombie, is not running anything)."""
    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(proc.cmdline()):
                pids.add(proc.pid)
        except psutil.Error:  # exited meanwhile
            continue
    return pids
