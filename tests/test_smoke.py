"""The demo model answers through a real vLLM engine."""

from conftest import _nvidia_gpus


def test_demo_model_knows_the_capital_of_france(engine):
    result = engine.generate("What is the capital of France?", temperature=0)
    assert "Paris" in result.text
    assert result.finish_reason == "stop"
    assert result.prompt_tokens > 5 and result.output_tokens > 0


def test_cpu_engine_uses_the_platform_defaults(engine):
    status = engine.status()
    # Decided apart from the product: NVML sees an NVIDIA GPU (vLLM's CUDA build runs there) or not.
    assert status.loaded and status.platform == ("cuda" if _nvidia_gpus() else "cpu")
    if status.platform == "cpu":
        assert status.dtype == "float32"
        assert status.engine_args["enforce_eager"] is True
        assert status.kv_cache_tokens and status.kv_cache_tokens > 10_000
    else:
        assert status.engine_args["enable_sleep_mode"] is True  # on a GPU every engine can sleep
