"""The demo-model engine the suite shares, and how a test that changes it gives it back.

The first use loads the demo model with no engine argument and remembers the resulting
:class:`EngineConfig`. ``restore()`` then makes the session run exactly that configuration again:
the same model, platform and resolved engine arguments (``EngineConfig.__eq__``), the same requested
arguments (none), awake and alive, with no other engine kept asleep.
A bare ``load()`` is not enough for that: it keeps any live demo-model engine that serves "no
argument", e.g. one a test switched to ``max_model_len=2048``.
"""

from __future__ import annotations

from vllm_magic import get_session
from vllm_magic.engine.config import EngineConfig
from vllm_magic.engine.session import EngineSession

_expected: EngineConfig | None = None


def expected_config() -> EngineConfig:
    """The configuration every test that uses the shared engine starts with."""
    if _expected is None:
        shared()
    assert _expected is not None
    return _expected


def _is_expected(session: EngineSession) -> bool:
    config = session.config
    return (config is not None and _expected is not None and config == _expected
            and config.requested == _expected.requested and config.cpu_threads == _expected.cpu_threads
            and not session.kept  # no sleeping engine a test kept holds memory beside it
            and session.serves(_expected))  # serves() also says the engine process is alive


def shared() -> EngineSession:
    """The process-wide session, running the demo configuration."""
    global _expected
    session = get_session()
    if _expected is None:
        session.load()
        assert session.config is not None and session.config.requested == {}, session.config
        _expected = session.config
    restore(session)
    return session


def restore(session: EngineSession | None = None) -> None:
    """Put the shared session back to the demo configuration the run started with."""
    session = get_session() if session is None else session
    if _expected is None:
        return  # nothing was shared yet: the next shared() loads it
    if not _is_expected(session):
        session.unload()  # also the sleeping engines a test kept
        session.load()
    elif session.asleep is not None:
        session.wake()
    assert _is_expected(session), f"the shared engine runs {session.config}, not {_expected}"
    assert session.asleep is None
