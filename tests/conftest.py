"""Shared fixtures: one real demo-model engine for the whole test session.

Every test that generates text uses ``engine`` (the process-wide session with the demo model
loaded once); tests that need an IPython shell use ``ip``. Sampling defaults are reset after each
test so that one test's settings never leak into the next.
"""

from __future__ import annotations

import pytest

from vllm_magic import get_session


@pytest.fixture(scope="session")
def engine():
    """The kernel-wide session with the demo model loaded (once per test run)."""
    session = get_session()
    session.load()
    yield session
    session.unload()


@pytest.fixture(autouse=True)
def _reset_sampling_defaults():
    yield
    get_session().defaults.reset()
