"""Tensor parallel and AWQ without an engine: thread binding, dtype choice, the two demo variants."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_magic.demo.variants import AWQ_PACK_ORDER, _pack, awq_quantize, prepare_awq_demo_model, prepare_tiny_model
from vllm_magic.engine import platform as engine_platform
from vllm_magic.engine.config import EngineConfig, resolve_engine_config
from vllm_magic.engine.platform import cpu_thread_binding, thread_binding_for_start
from vllm_magic.errors import ConfigError


@pytest.fixture
def cores(monkeypatch):
    """The cores this process may use, as the binding sees them (no user binding set)."""
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)

    def use(values):
        monkeypatch.setattr(engine_platform, "_usable_cores", lambda: list(values))

    return use


def test_one_rank_leaves_thread_placement_to_the_os(cores):
    cores([0, 1])
    assert cpu_thread_binding({}) == "nobind"
    assert cpu_thread_binding({"tensor_parallel_size": 1}) == "nobind"


def test_each_tensor_parallel_rank_gets_its_own_cores(cores):
    cores([0, 1])
    assert cpu_thread_binding({"tensor_parallel_size": 2}) == "0|1"
    cores(range(16))
    assert cpu_thread_binding({"tensor_parallel_size": 4}) == "0-3|4-7|8-11|12-15"
    assert cpu_thread_binding({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}) == "0-3|4-7|8-11|12-15"
    cores([0, 1, 2, 4, 5, 6, 7])  # uneven, with a hole: the first ranks take one more core
    assert cpu_thread_binding({"tensor_parallel_size": 2}) == "0-2,4|5-7"


def test_more_ranks_than_cores_is_refused_in_one_line(cores):
    cores([0, 1])
    with pytest.raises(ConfigError) as caught:
        cpu_thread_binding({"tensor_parallel_size": 4})
    message = str(caught.value)
    assert message == ("tensor parallel 4 needs 4 CPU cores (one per rank), and this process may use 2: "
                       "use fewer ranks, or set VLLM_CPU_OMP_THREADS_BIND yourself")


def test_a_binding_the_user_set_wins(cores, monkeypatch):
    cores([0, 1])
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1|0")
    assert cpu_thread_binding({"tensor_parallel_size": 2}) == "1|0"
    assert cpu_thread_binding({"tensor_parallel_size": 8}) == "1|0"  # the user knows; vLLM checks it


def test_the_binding_is_in_the_environment_only_while_the_engine_starts(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    config = EngineConfig("m", {"tensor_parallel_size": 2}, "cpu", cpu_threads="0|1")
    with thread_binding_for_start(config):
        assert engine_platform.os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine_platform.os.environ
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    with thread_binding_for_start(config):
        pass
    assert engine_platform.os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


def test_the_load_line_says_how_the_model_is_split():
    split = EngineConfig("m", {"tensor_parallel_size": 2}, "cpu", cpu_threads="0|1")
    assert split.parallel_summary == "tensor parallel 2, threads on cores 0 | 1"
    assert EngineConfig("m", {}, "cpu", cpu_threads="nobind").parallel_summary == ""
    assert EngineConfig("m", {"tensor_parallel_size": 4}, "cuda").parallel_summary == "tensor parallel 4"


def test_the_cpu_runs_awq_in_16_bits_and_everything_else_in_float32():
    tiny, awq = prepare_tiny_model(quiet=True), prepare_awq_demo_model(quiet=True)
    assert engine_platform._cpu_dtype(str(tiny), {}) == "float32"
    assert engine_platform._cpu_dtype(str(awq), {}) == "float16"  # the checkpoint's own
    assert engine_platform._cpu_dtype(str(tiny), {"quantization": "awq"}) in ("float16", "bfloat16")


def test_tiny_model_has_splittable_heads_and_keeps_each_head_with_its_kv_head():
    from safetensors import safe_open

    tiny = prepare_tiny_model(quiet=True)
    config = json.loads((tiny / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (12, 4, 64)
    for size in (1, 2, 4):
        assert config["num_attention_heads"] % size == 0 and config["num_key_value_heads"] % size == 0
    with safe_open(str(tiny / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        k = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
        o = f.get_tensor("model.layers.0.self_attn.o_proj.weight")
    assert q.shape == (768, 576) and k.shape == (256, 576) and o.shape == (576, 768)
    # The original 9 heads (3 per KV head) come first; the added ones read and write nothing.
    assert q[:576].abs().sum() > 0 and q[576:].abs().sum() == 0
    assert k[:192].abs().sum() > 0 and k[192:].abs().sum() == 0
    assert o[:, 576:].abs().sum() == 0


def _unpack(packed):
    """Undo AWQ's packing: [rows, cols/8] int32 -> [rows, cols] levels."""
    rows, groups = packed.shape
    out = torch.zeros(rows, groups * 8, dtype=torch.int32)
    for i, column in enumerate(AWQ_PACK_ORDER):
        out[:, column::8] = (packed >> (4 * i)) & 0xF
    return out


def test_awq_quantization_packs_levels_that_dequantize_close_to_the_weights():
    torch.manual_seed(0)
    weight = torch.randn(64, 96) * 0.05
    qweight, qzeros, scales = awq_quantize(weight, group_size=32)
    assert qweight.shape == (96, 8) and qzeros.shape == (3, 8) and scales.shape == (3, 64)
    assert qweight.dtype == qzeros.dtype == torch.int32 and scales.dtype == torch.float16
    levels, zeros = _unpack(qweight), _unpack(qzeros)  # [in, out], [in/32, out]
    assert int(levels.min()) >= 0 and int(levels.max()) <= 15
    groups = torch.arange(96) // 32
    restored = ((levels - zeros[groups]).float() * scales.float()[groups]).t()
    step = scales.float().max().item()
    assert (restored - weight).abs().max().item() <= step / 2 + 1e-6  # round to nearest: half a step


def test_awq_packing_matches_vllms_unpacking_order():
    # vLLM reads nibble i of AWQ's int32 as column [0, 4, 1, 5, 2, 6, 3, 7][i] (its reverse order):
    # the same column each nibble of ours holds.
    reverse = [0, 4, 1, 5, 2, 6, 3, 7]
    values = torch.arange(8, dtype=torch.int32).reshape(1, 8)
    packed = _pack(values)
    nibbles = [(int(packed[0, 0]) >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == list(AWQ_PACK_ORDER)
    assert [nibbles.index(c) for c in range(8)] == reverse


def test_awq_model_is_a_complete_awq_checkpoint():
    from safetensors import safe_open

    awq = prepare_awq_demo_model(quiet=True)
    config = json.loads((awq / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32,
                                             "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    with safe_open(str(awq / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.down_proj.qweight" in names and "model.layers.0.mlp.down_proj.weight" not in names
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= names


def test_a_model_given_as_a_path_object_resolves_as_its_string():
    tiny = prepare_tiny_model(quiet=True)
    assert resolve_engine_config(tiny) == resolve_engine_config(str(tiny))
