"""Sleeping engines in the session: what runs on CPU.

vLLM's sleep mode needs an NVIDIA GPU. On CPU the real engine refuses %vllm_sleep and
%vllm_load --keep with one line and keeps serving. The session's bookkeeping of kept engines
(which one is awake, which sleep, the cap, the host-RAM fallback, one unload for all, a request
waking a sleeping engine) is pure logic: it is checked here with backends that only record what
the session asks of them. The real sleep and wake run in tests/test_sleep_gpu.py.
"""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from ipython_capture import make_shell

from vllm_magic.engine.backends.base import Backend, SleepReport, UnloadReport
from vllm_magic.engine.config import EngineConfig
from vllm_magic.engine.requests.prompts import Prepared
from vllm_magic.engine.session import EngineSession
from vllm_magic.errors import SleepError
from vllm_magic.magics.commands import VllmMagics

GiB = 1 << 30


class RecordingBackend(Backend):
    """Stands in for a GPU engine: sleeps, wakes and shuts down in memory, and says so."""

    kind = "local"

    def __init__(self, config: EngineConfig, events: list[str], weights: int = GiB, reloadable: bool = True) -> None:
        self.config = config
        self.events = events
        self.weights = weights
        self.reloadable = reloadable
        self.dtype, self.max_model_len, self.kv_cache_tokens = "bfloat16", 2048, 1000
        self.load_seconds, self.started, self.vllm_version = 0.0, 0.0, "test"
        self.asleep = None
        self.added: list[str] = []

    @property
    def name(self) -> str:
        return self.config.model

    # sleep mode
    def sleep_refusal(self, level: int) -> str | None:
        return None if level == 1 or self.reloadable else "dummy weights cannot be loaded again"

    def weight_bytes(self) -> int:
        return self.weights

    def sleep(self, level: int = 1) -> SleepReport:
        self.events.append(f"sleep {self.name} {level}")
        self.asleep = SleepReport(self.name, level, 0.1, 10 * GiB, 2 * GiB, 0.0)
        return self.asleep

    def wake(self) -> float:
        if self.asleep is not None:
            self.events.append(f"wake {self.name}")
            self.asleep = None
        return 0.5

    def shutdown(self, baseline=None) -> UnloadReport:
        self.events.append(f"shutdown {self.name}")
        return UnloadReport(self.name, 1, 0, None, None)

    # requests: each one finishes at once with the text "ok"
    def _params(self, defaults, overrides, structured):
        return _Params()

    def _given_params(self, sampling):
        return sampling

    def render(self, prompts, raw, system, template=None):
        return [Prepared(str(item), [1, 2]) for item in prompts]

    def _fit(self, params, prompt_tokens):
        return params

    def add(self, requests) -> None:
        assert self.asleep is None, "a request reached a sleeping engine"
        for handle, _ in requests:
            self.added.append(handle.request_id)
            handle.push(0, "ok", [7], "stop")
            handle.finish()

    def abort(self, request_ids) -> None:
        pass

    def abort_all(self) -> int:
        return 0

    @property
    def live_count(self) -> int:
        return 0

    def death(self) -> str | None:
        return None

    def memory(self):
        return None, ""


class _Params:
    n = 1


class RecordingSession(EngineSession):
    """The session, with engines that record instead of running vLLM."""

    def __init__(self, weights: int = GiB, reloadable: bool = True) -> None:
        super().__init__()
        self.events: list[str] = []
        self.weights, self.reloadable = weights, reloadable

    def _validate(self, config: EngineConfig) -> None:
        pass

    def _start(self, config, verbose, progress) -> Backend:
        self.events.append(f"start {config.model}")
        return RecordingBackend(config, self.events, self.weights, self.reloadable)


@pytest.fixture
def session() -> RecordingSession:
    return RecordingSession()


def test_keep_puts_the_loaded_engine_to_sleep_and_loading_it_again_wakes_it(session):
    session.load("model-a")
    info = session.load("model-b", keep=True)
    assert info.kept.startswith("model-a kept asleep (level 1")
    assert [k.model for k in session.kept] == ["model-a"]
    assert session.events == ["start model-a", "sleep model-a 1", "start model-b"]

    back = session.load("model-a", keep=True)
    assert back.woken and "woken from sleep" in back.summary
    assert session.config.model == "model-a" and session.asleep is None
    assert [k.model for k in session.kept] == ["model-b"]
    assert session.events[3:] == ["sleep model-b 1", "wake model-a"]
    assert session.engines_created == 2


def test_a_load_without_keep_replaces_the_awake_engine_and_leaves_sleeping_ones(session):
    session.load("model-a")
    session.load("model-b", keep=True)
    session.load("model-c")
    assert session.events[-2:] == ["shutdown model-b", "start model-c"]
    assert [k.model for k in session.kept] == ["model-a"]


def test_at_most_max_kept_engines_sleep_and_the_oldest_is_unloaded(session):
    session.load("model-a")
    session.load("model-b", keep=True)
    session.load("model-c", keep=True)
    info = session.load("model-d", keep=True)
    assert "unloaded model-a (at most 2 sleeping engines)" in info.kept
    assert [k.model for k in session.kept] == ["model-c", "model-b"]
    assert "shutdown model-a" in session.events


def test_weights_larger_than_the_free_host_ram_sleep_at_level_2():
    session = RecordingSession(weights=1 << 50)
    session.load("model-a")
    info = session.load("model-b", keep=True)
    assert "kept asleep (level 2" in info.kept and "do not fit the host RAM" in info.kept
    assert session.kept[0].level == 2


def test_weights_that_fit_nowhere_and_cannot_be_reloaded_are_unloaded():
    session = RecordingSession(weights=1 << 50, reloadable=False)
    session.load("model-a")
    info = session.load("model-b", keep=True)
    assert info.kept.startswith("unloaded model-a") and "cannot be reloaded" in info.kept
    assert session.kept == [] and "shutdown model-a" in session.events


def test_unload_frees_the_awake_engine_and_every_sleeping_one(session):
    session.load("model-a")
    session.load("model-b", keep=True)
    assert session.unload() is True
    assert {"shutdown model-a", "shutdown model-b"} <= set(session.events)
    assert session.kept == [] and not session.loaded
    assert session.unload() is False


def test_a_request_to_a_sleeping_engine_wakes_it_first(session):
    session.load("model-a")
    session.sleep(1)
    assert session.status().asleep.level == 1
    result = session.generate("hello")
    assert result.text == "ok"
    assert session.events[-2:] == ["sleep model-a 1", "wake model-a"]
    assert session.asleep is None


def test_loading_the_sleeping_engine_again_wakes_it_in_place(session):
    session.load("model-a")
    session.sleep(2)
    info = session.load("model-a")
    assert info.already_loaded and info.woken
    assert session.events == ["start model-a", "sleep model-a 2", "wake model-a"]


def test_status_lists_the_sleeping_engines_and_what_they_hold(session):
    session.load("model-a")
    session.load("model-b", keep=True)
    session.sleep(1)
    text = session.status()._repr_markdown_()
    assert "asleep (level 1): weights in host RAM, KV cache discarded" in text
    assert "Sleeping engines" in text and "`model-a` asleep (level 1" in text


# ----- the real CPU engine refuses, in one line, and keeps serving ------------------------------------

@pytest.fixture
def magics(engine):
    shell, _ = make_shell()
    return VllmMagics(shell=shell, session=engine)


def on_gpu(engine) -> bool:
    # On an NVIDIA GPU the engine sleeps instead (tests/test_sleep_gpu.py checks it there).
    return engine.status().platform == "cuda"


def test_sleep_on_cpu_is_refused_in_one_line_and_the_engine_keeps_serving(engine, magics):
    if on_gpu(engine):
        magics.vllm_sleep("")
        assert engine.asleep is not None
    else:
        with pytest.raises(UsageError, match=r"^sleep mode needs an NVIDIA GPU \(vLLM's sleep mode\), and this "
                                             r"engine runs on cpu$"):
            magics.vllm_sleep("")
        with pytest.raises(SleepError):
            engine.sleep(2)
        assert engine.asleep is None
    assert engine.generate("Say hi.", max_tokens=2, temperature=0).output_tokens == 2
    assert engine.asleep is None


def test_keep_on_cpu_is_refused_before_anything_changes(engine, magics):
    if on_gpu(engine):  # there --keep can keep it: nothing to refuse (test_sleep_gpu keeps one for real)
        assert engine.backend.sleep_refusal(1) is None
    else:
        created, model = engine.engines_created, engine.config.model
        with pytest.raises(UsageError, match="^--keep puts the loaded engine to sleep: sleep mode needs an NVIDIA GPU"):
            magics.vllm_load("--keep --max-model-len 512 --no-controls")
        assert engine.engines_created == created and engine.config.model == model and engine.kept == []


def test_wake_of_an_awake_engine_says_so(engine, magics, capsys):
    magics.vllm_wake("")
    assert capsys.readouterr().out.strip().endswith("is awake")


def test_sleep_level_other_than_1_or_2_is_a_usage_error(engine, magics):
    with pytest.raises(UsageError, match="invalid choice"):
        magics.vllm_sleep("3")


def test_sleep_with_no_engine_loaded_says_to_load_one():
    magics = VllmMagics(shell=make_shell()[0], session=EngineSession())
    with pytest.raises(UsageError, match="^no model is loaded"):
        magics.vllm_sleep("")
