"""Two variants of the demo model, made from it locally, for tensor parallel and quantization.

* :func:`prepare_tiny_model` (``python -m vllm_magic tiny-model``): the demo model reshaped so that
  tensor parallel can split it. SmolLM2-135M has 9 attention heads over 3 KV heads, which no TP size
  above 1 divides. Three query heads and one KV head are added whose weights are all zero (so is the
  output projection that reads them): 12 heads over 4 KV heads, divisible by 1, 2 and 4, and the
  model computes exactly what the demo model computes, so it still answers in English.
* :func:`prepare_awq_demo_model` (``python -m vllm_magic demo-model --awq``): the demo model as an
  AWQ checkpoint, 4-bit weights with a zero point per group of 32 inputs, packed the way AutoAWQ's
  GEMM kernels expect. The weights are rounded to the nearest level (no activation-aware search,
  which needs calibration data), which keeps this 135M model's short answers right.

Both are prepared once into the vllm-magic cache beside the demo model, from it, and are checked
like it (a manifest of every file's size and SHA-256).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .. import paths
from .model import DEMO_MODEL_NAME, GGUF_SHA256, _manifest_problem, _say, install_prepared, prepare_demo_model

__all__ = ["prepare_tiny_model", "prepare_awq_demo_model", "TINY_MODEL_NAME", "AWQ_MODEL_NAME", "AWQ_GROUP_SIZE"]

TINY_MODEL_NAME = f"{DEMO_MODEL_NAME}-TP4"
AWQ_MODEL_NAME = f"{DEMO_MODEL_NAME}-AWQ"
AWQ_GROUP_SIZE = 32
AWQ_BITS = 4
#: AutoAWQ's GEMM packing: the 8 nibbles of an int32 hold output columns in this order.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: The demo model's linear layers that AWQ quantizes (embeddings and norms stay as they are).
_LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
#: Bump when a variant's preparation changes, so old caches are rebuilt.
VARIANT_VERSION = 1
#: Files of the demo model that every variant keeps as they are (tokenizer, chat template).
_KEPT = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
         "special_tokens_map.json")


def prepare_tiny_model(cache: str | Path | None = None, *, verify: bool = False, quiet: bool = False) -> Path:
    """Prepare the demo model reshaped for tensor parallel (12 heads, 4 KV heads) and return its
    directory. Its greedy answers are the demo model's; TP sizes 1, 2 and 4 can split it."""
    return _prepare_variant(TINY_MODEL_NAME, _pad_heads, cache, verify=verify, quiet=quiet,
                            what="the demo model reshaped for tensor parallel (12 heads, 4 KV heads)")


def prepare_awq_demo_model(cache: str | Path | None = None, *, verify: bool = False, quiet: bool = False) -> Path:
    """Prepare the demo model as a 4-bit AWQ checkpoint (group size 32, zero point, GEMM packing)
    and return its directory; vLLM loads it with ``quantization="awq"``."""
    return _prepare_variant(AWQ_MODEL_NAME, _quantize_awq, cache, verify=verify, quiet=quiet,
                            what="the demo model as a 4-bit AWQ checkpoint")


def _prepare_variant(name: str, build: Callable[[Path, Path], None], cache: str | Path | None, *,
                     verify: bool, quiet: bool, what: str) -> Path:
    root = Path(cache).expanduser() if cache else paths.cache_dir()
    source = prepare_demo_model(root, verify=verify, quiet=quiet)
    target = paths.model_dir(name, root)
    expect = {"variant": name, "variant_version": VARIANT_VERSION, "gguf_sha256": GGUF_SHA256}
    problem = _manifest_problem(target, verify, expect)
    if problem is None:
        return target
    _say(quiet, f"preparing {what} into {target} (once)" if not target.exists()
         else f"{target}: {problem}; preparing it again")
    with tempfile.TemporaryDirectory(dir=root, prefix=".prepare-") as tmp:
        out = Path(tmp) / "model"
        out.mkdir()
        for kept in _KEPT:
            if (source / kept).is_file():
                shutil.copy2(source / kept, out / kept)
        build(source, out)
        install_prepared(out, target, {**expect, "source": DEMO_MODEL_NAME})
    _say(quiet, f"ready: {target}")
    return target


def _read(source: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return json.loads((source / "config.json").read_text()), load_file(str(source / "model.safetensors"))


def _write(out: Path, config: dict, tensors: dict) -> None:
    from safetensors.torch import save_file

    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


def _pad_heads(source: Path, out: Path, multiple: int = 4) -> None:
    """Add zero query heads and zero KV heads until both counts divide by ``multiple``, keeping each
    original query head with its KV head (grouped-query attention maps head i to KV head i // group)."""
    import torch

    config, tensors = _read(source)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    group = heads // kv_heads
    new_kv = -(-kv_heads // multiple) * multiple
    new_heads = new_kv * group  # the same group size, so every original head keeps its KV head
    assert new_heads % multiple == 0
    extra_q, extra_kv = (new_heads - heads) * head_dim, (new_kv - kv_heads) * head_dim
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.self_attn."
        q, k, v, o = (tensors[prefix + p + ".weight"] for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        tensors[prefix + "q_proj.weight"] = torch.cat([q, q.new_zeros(extra_q, q.shape[1])])
        tensors[prefix + "k_proj.weight"] = torch.cat([k, k.new_zeros(extra_kv, k.shape[1])])
        tensors[prefix + "v_proj.weight"] = torch.cat([v, v.new_zeros(extra_kv, v.shape[1])])
        tensors[prefix + "o_proj.weight"] = torch.cat([o, o.new_zeros(o.shape[0], extra_q)], dim=1)
    config.update(num_attention_heads=new_heads, num_key_value_heads=new_kv, head_dim=head_dim)
    _write(out, config, tensors)


def awq_quantize(weight, group_size: int = AWQ_GROUP_SIZE):
    """Round-to-nearest 4-bit quantization of a linear layer's ``weight`` ([out, in]) in AWQ's GEMM
    layout: ``qweight`` [in, out/8] and ``qzeros`` [in/group, out/8] (int32, 8 nibbles each, in
    AutoAWQ's order) and ``scales`` [in/group, out] (float16). Dequantized, a weight is
    ``(level - zero) * scale``."""
    import torch

    out_features, in_features = weight.shape
    if in_features % group_size or out_features % 8:
        raise ValueError(f"AWQ needs inputs divisible by {group_size} and outputs by 8, not {tuple(weight.shape)}")
    levels = (1 << AWQ_BITS) - 1
    w = weight.float().reshape(out_features, in_features // group_size, group_size)
    low, high = w.amin(dim=2), w.amax(dim=2)
    scales = ((high - low) / levels).clamp(min=1e-8).half().float()  # the stored precision
    zeros = torch.round(-low / scales).clamp(0, levels)
    q = torch.round(w / scales[..., None] + zeros[..., None]).clamp(0, levels).to(torch.int32)
    q = q.reshape(out_features, in_features).t().contiguous()  # [in, out]
    return _pack(q), _pack(zeros.t().contiguous().to(torch.int32)), scales.t().contiguous().half()


def _pack(values):
    """Pack int32 levels [rows, cols] into [rows, cols/8] int32, nibble i holding column AWQ_PACK_ORDER[i]."""
    import torch

    rows, cols = values.shape
    grouped = values.reshape(rows, cols // 8, 8)
    packed = torch.zeros(rows, cols // 8, dtype=torch.int32)
    for i, column in enumerate(AWQ_PACK_ORDER):
        packed |= grouped[:, :, column] << (AWQ_BITS * i)
    return packed


def _quantize_awq(source: Path, out: Path) -> None:
    import torch

    config, tensors = _read(source)
    for layer in range(config["num_hidden_layers"]):
        for name in _LINEAR:
            prefix = f"model.layers.{layer}.{name}."
            qweight, qzeros, scales = awq_quantize(tensors.pop(prefix + "weight"))
            tensors.update({prefix + "qweight": qweight, prefix + "qzeros": qzeros, prefix + "scales": scales})
    # AWQ kernels compute in 16-bit: the rest of the model is stored that way too.
    tensors = {k: v.half() if v.is_floating_point() and v.dtype != torch.float16 else v for k, v in tensors.items()}
    config.update(dtype="float16", torch_dtype="float16", quantization_config={
        "quant_method": "awq", "bits": AWQ_BITS, "group_size": AWQ_GROUP_SIZE, "zero_point": True,
        "version": "gemm", "modules_to_not_convert": None})
    _write(out, config, tensors)

