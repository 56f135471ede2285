"""How an engine is sized on a shared NVIDIA GPU, and the GPU's dtype for checkpoints prepared here (pure logic: NVML and vLLM's shape are faked here;
tests/test_gpu_sharing.py runs it on a GPU)."""

from __future__ import annotations

import json

import pytest

from vllm_magic.engine import gpu_memory
from vllm_magic.engine.config import EngineConfig
from vllm_magic.engine.flags import FlagError, load_flags, serve_flags
from vllm_magic.engine.gpu_memory import GiB, CardMemory, DoesNotFit, Holder
from vllm_magic.engine.platform import platform_defaults

PER_TOKEN = 131072  # Llama-3-8B in bf16: 32 layers x 8 KV heads x 128 x 2 (K and V) x 2 bytes
WEIGHTS = 16 * GiB
H100 = 80 * GiB


@pytest.fixture
def card(monkeypatch):
    """One 80 GiB GPU with ``free`` bytes free, an 8B-shaped model of 4,096 tokens, and two holders."""
    state = {"free": 79 * GiB, "len": 4096}
    monkeypatch.setattr(gpu_memory, "cards", lambda: [CardMemory(0, state["free"], H100)])
    monkeypatch.setattr(gpu_memory, "_engine_shape", lambda config, log: (state["len"], PER_TOKEN, WEIGHTS))
    monkeypatch.setattr(gpu_memory, "holders", lambda index: [Holder(11, 40 * GiB, "kernel 1a2b3c4d (pid 11)"),
                                                              Holder(12, 6 * GiB, "pid 12 python3 (ana)")])
    return state


def cuda(**kwargs) -> EngineConfig:
    return EngineConfig(model="/models/llama8b", engine_kwargs=kwargs, platform="cuda", requested=dict(kwargs))


def test_the_default_kv_cache_holds_sixteen_full_length_sequences(card):
    plan = gpu_memory.plan(cuda())
    assert plan.kv_cache_bytes == 16 * 4096 * PER_TOKEN  # 8 GiB, not 92% of the card
    assert plan.describe() == "KV cache 8.0 GiB (16 sequences of 4,096 tokens)"
    sized = plan.engine_kwargs()
    assert sized["kv_cache_memory_bytes"] == 8 * GiB
    # vLLM's start-up check (free >= utilization x card) passes with what is free now
    assert sized["gpu_memory_utilization"] * H100 <= card["free"]


def test_concurrency_raises_the_kv_cache(card):
    assert gpu_memory.plan(cuda(concurrency=32)).kv_cache_bytes == 32 * 4096 * PER_TOKEN


def test_a_long_context_is_held_to_half_the_memory_free_after_the_weights(card):
    card["len"] = 131072  # 16 GiB a sequence: 16 of them would be 256 GiB
    plan = gpu_memory.plan(cuda())
    assert plan.capped and plan.kv_cache_bytes == (79 * GiB - WEIGHTS - gpu_memory.OVERHEAD_BYTES) // 2
    assert "held by the free memory" in plan.describe()


def test_one_full_sequence_is_kept_when_half_the_free_memory_is_less(card):
    card["len"], card["free"] = 131072, 36 * GiB  # room 18 GiB: half is 9, one sequence 16
    assert gpu_memory.plan(cuda()).kv_cache_bytes == 131072 * PER_TOKEN


def test_a_start_that_cannot_fit_is_one_line_with_what_is_free_who_holds_it_and_what_to_pass(card):
    card["len"], card["free"] = 131072, 24 * GiB
    with pytest.raises(DoesNotFit) as caught:
        gpu_memory.plan(cuda())
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("/models/llama8b does not fit on GPU 0: it needs about 34.0 GiB (16.0 of weights, "
                              "16.0 of KV cache for 1 sequence(s) of 131,072 tokens, 2 of overhead)")
    assert "24.0 of 80.0 GiB are free, held by kernel 1a2b3c4d (pid 11) (40.0 GiB), pid 12 python3 (ana) (6.0 GiB)" \
        in message
    assert "pass --max-model-len 49152" in message  # what the 6 GiB left after the weights hold


def test_vllms_own_sizing_when_the_user_gives_a_memory_fraction_or_off_the_gpu(card):
    assert gpu_memory.plan(cuda(gpu_memory_utilization=0.9)) is None
    assert gpu_memory.plan(EngineConfig(model="/m", engine_kwargs={}, platform="cpu")) is None


def test_a_given_kv_cache_size_is_kept_and_the_start_up_check_still_fits(card):
    plan = gpu_memory.plan(cuda(kv_cache_memory_bytes=2 * GiB))
    assert plan.engine_kwargs()["kv_cache_memory_bytes"] == 2 * GiB
    assert plan.engine_kwargs()["gpu_memory_utilization"] < 0.99


def test_an_engine_sized_here_does_not_serve_a_request_for_vllms_own_sizing():
    running = cuda()
    assert not running.serves(cuda(gpu_memory_utilization=0.92))
    assert not running.serves(cuda(concurrency=64))
    assert running.serves(cuda(concurrency=16))  # the default, said out loud


def test_concurrency_is_read_from_load_and_serve_lines_and_never_reaches_vllm():
    assert load_flags("--concurrency 4 --max-model-len 2048").engine == {"max_model_len": 2048, "concurrency": 4}
    assert serve_flags("--concurrency 2").engine == {"concurrency": 2}
    with pytest.raises(FlagError, match="whole number of at least 1"):
        load_flags("--concurrency 0")
    assert "concurrency" not in cuda(concurrency=4).llm_kwargs()


def test_a_kernel_is_named_by_its_id_from_its_connection_file():
    class Proc:
        def __init__(self, cmdline):
            self._cmdline = cmdline

        def cmdline(self):
            return self._cmdline

    launcher = ["python", "-m", "ipykernel_launcher", "-f"]
    assert gpu_memory._kernel_id(Proc([*launcher, "/run/jupyter/kernel-3f2a9c1e-77.json"])) == "3f2a9c1e-77"
    assert gpu_memory._kernel_id(Proc([*launcher, "/tmp/x/kernel.json"])) == ""
    assert gpu_memory._kernel_id(Proc(["python", "train.py"])) is None


def _checkpoint(tmp_path, name, prepared=True, **config):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if prepared:
        (folder / "vllm-magic-manifest.json").write_text("{}")
    return str(folder)


def test_a_float32_checkpoint_prepared_here_runs_in_float32_on_a_gpu_as_on_a_cpu(tmp_path):
    demo = _checkpoint(tmp_path, "demo", torch_dtype="float32")
    assert platform_defaults("cuda", demo, {})[0]["dtype"] == "float32"
    assert platform_defaults("cuda", demo, {"dtype": "bfloat16"})[0]["dtype"] == "bfloat16"  # the user's wins
    awq = _checkpoint(tmp_path, "awq", torch_dtype="float16", quantization_config={"quant_method": "awq"})
    theirs = _checkpoint(tmp_path, "theirs", prepared=False, torch_dtype="float32")
    assert "dtype" not in platform_defaults("cuda", awq, {})[0]
    assert "dtype" not in platform_defaults("cuda", theirs, {})[0]  # vLLM's default for other checkpoints
