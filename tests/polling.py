"""Waiting for an outside state that sends no event: a server's /metrics, processes appearing.

The one place in tests/ that sleeps (test_suite_rules allows it here only): everything a test can
wait on as an event (a request's deltas, a cell's outputs, a display update) is waited on as one.
"""

from __future__ import annotations

import time
from typing import Callable


def until(condition: Callable[[], bool], timeout: float = 600, what: str = "the awaited state") -> None:
    """Return once ``condition()`` holds (checked ten times a second); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} never came in {timeout} s"
        time.sleep(0.1)
