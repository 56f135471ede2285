"""Whether the live engine serves a load request (the one rule of ``%vllm_load``, ``session.load``
and the LangChain classes), and how LangChain fields become a request: pure logic, no engine."""

from __future__ import annotations

import pytest
from vllm_magic.engine.config import EngineConfig
from vllm_magic.errors import RequestError
from vllm_magic.langchain.base import call_overrides, engine_request, without_needless_fetch_args

LIVE = EngineConfig(model="/models/demo", platform="cpu",
                    engine_kwargs={"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.5})


def wanted(**requested):
    """A request for the demo model with these user-given engine arguments (platform defaults added)."""
    return EngineConfig(model="/models/demo", platform="cpu", engine_kwargs={**LIVE.engine_kwargs, **requested},
                        requested=requested)


def test_community_defaults_ask_for_nothing():
    assert engine_request("SmolLM2-135M-Instruct", 1, False, "auto", None, {}) == (None, {})
    assert engine_request("HuggingFaceTB/SmolLM2-135M-Instruct", None, None, "auto", None, None) == (None, {})
    assert engine_request("org/model", 2, True, "bfloat16", "/d", {"max_model_len": 4096}) == (
        "org/model", {"max_model_len": 4096, "tensor_parallel_size": 2, "trust_remote_code": True,
                      "dtype": "bfloat16", "download_dir": "/d"})


def test_model_inside_vllm_kwargs_is_refused():
    with pytest.raises(RequestError):
        engine_request(None, 1, False, "auto", None, {"model": "x"})


def test_same_configuration_is_served():
    assert LIVE.serves(wanted())


def test_fetch_only_arguments_do_not_need_another_engine():
    assert LIVE.serves(wanted(trust_remote_code=True, download_dir="/d"))


def test_values_the_live_engine_has_are_served():
    assert LIVE.serves(wanted(dtype="float32", enforce_eager=True))
    # max_model_len was derived by vLLM: compared with what the engine runs with
    assert LIVE.serves(wanted(max_model_len=8192), lambda: {"max_model_len": 8192})


def test_arguments_a_request_leaves_open_are_the_live_engines_choice():
    live = EngineConfig(model="/models/demo", platform="cpu", engine_kwargs={**LIVE.engine_kwargs, "max_model_len": 1024},
                        requested={"max_model_len": 1024})
    assert live.serves(wanted())


def test_a_different_engine_configuration_is_not_served():
    assert not LIVE.serves(wanted(max_model_len=4096), lambda: {"max_model_len": 8192})
    assert not LIVE.serves(wanted(dtype="bfloat16"))
    other = EngineConfig(model="/models/other", platform="cpu", engine_kwargs=LIVE.engine_kwargs)
    assert not LIVE.serves(other)


def test_call_overrides_merge_and_call_time_stop_wins():
    sampling, options = call_overrides({"temperature": 0.2, "stop": ["a"]}, ["b"],
                                       {"max_new_tokens": 7, "top_k": None, "choice": ["x", "y"]}, "VLLM")
    assert sampling == {"temperature": 0.2, "stop": ["b"], "max_tokens": 7}
    assert options == {"choice": ["x", "y"]}
    with pytest.raises(RequestError, match="temprature"):
        call_overrides({}, None, {"temprature": 0}, "VLLM")


def test_fetch_only_arguments_are_dropped_for_a_local_model_without_code(tmp_path):
    plain, coded = tmp_path / "plain", tmp_path / "coded"
    plain.mkdir(), coded.mkdir()
    (plain / "config.json").write_text('{"model_type": "llama"}')
    (coded / "config.json").write_text('{"model_type": "x", "auto_map": {"AutoConfig": "x.XConfig"}}')
    asked = {"trust_remote_code": True, "download_dir": "/d", "max_model_len": 2048}
    assert without_needless_fetch_args(str(plain), asked) == {"max_model_len": 2048}
    assert without_needless_fetch_args(str(coded), asked) == {"trust_remote_code": True, "max_model_len": 2048}
    assert without_needless_fetch_args("org/model", asked) == asked  # a Hub id: nothing known locally
