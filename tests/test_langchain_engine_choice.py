"""Which engine a LangChain object uses: pure logic on resolved configurations (no engine)."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError

from vllm_magic.engine_config import EngineConfig
from vllm_magic.langchain_engine import call_overrides, engine_request, engine_serves, without_needless_fetch_args

LIVE = EngineConfig(model="/models/demo", platform="cpu",
                    engine_kwargs={"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.5})


def wanted(**kwargs):
    return EngineConfig(model="/models/demo", platform="cpu", engine_kwargs={**LIVE.engine_kwargs, **kwargs})


def test_community_defaults_ask_for_nothing():
    assert engine_request("SmolLM2-135M-Instruct", 1, False, "auto", None, {}) == (None, {})
    assert engine_request("HuggingFaceTB/SmolLM2-135M-Instruct", None, None, "auto", None, None) == (None, {})
    assert engine_request("org/model", 2, True, "bfloat16", "/d", {"max_model_len": 4096}) == (
        "org/model", {"max_model_len": 4096, "tensor_parallel_size": 2, "trust_remote_code": True,
                      "dtype": "bfloat16", "download_dir": "/d"})


def test_model_inside_vllm_kwargs_is_refused():
    with pytest.raises(UsageError):
        engine_request(None, 1, False, "auto", None, {"model": "x"})


def test_same_configuration_is_served():
    assert engine_serves(LIVE, wanted(), {})


def test_fetch_only_arguments_do_not_need_another_engine():
    assert engine_serves(LIVE, wanted(trust_remote_code=True, download_dir="/d"),
                         {"trust_remote_code": True, "download_dir": "/d"})


def test_values_the_live_engine_has_are_served():
    assert engine_serves(LIVE, wanted(), {"dtype": "float32", "enforce_eager": True})
    # max_model_len was derived by vLLM: compared with what the engine runs with
    assert engine_serves(LIVE, wanted(max_model_len=8192), {"max_model_len": 8192}, lambda: {"max_model_len": 8192})


def test_a_different_engine_configuration_is_not_served():
    assert not engine_serves(LIVE, wanted(max_model_len=4096), {"max_model_len": 4096}, lambda: {"max_model_len": 8192})
    assert not engine_serves(LIVE, wanted(dtype="bfloat16"), {"dtype": "bfloat16"})
    other = EngineConfig(model="/models/other", platform="cpu", engine_kwargs=LIVE.engine_kwargs)
    assert not engine_serves(LIVE, other, {})


def test_call_overrides_merge_and_call_time_stop_wins():
    sampling, options = call_overrides({"temperature": 0.2, "stop": ["a"]}, ["b"],
                                       {"max_new_tokens": 7, "top_k": None, "choice": ["x", "y"]}, "VLLM")
    assert sampling == {"temperature": 0.2, "stop": ["b"], "max_tokens": 7}
    assert options == {"choice": ["x", "y"]}
    with pytest.raises(UsageError, match="temprature"):
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
