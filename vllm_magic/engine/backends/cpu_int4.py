"""4-bit weights (AWQ, GPTQ) on CPUs for which vLLM's CPU build has no int4 kernel.

vLLM's CPU build runs 4-bit linear layers with its ``cpu_gemm_wna16`` kernel, which is compiled
into its AVX-512 library only: on an AVX2 machine (many AMD and older Intel CPUs, laptops) an AWQ
model loads and then its engine dies at the first forward pass. vllm-magic registers :func:`register`
as a vLLM general plugin (``vllm.general_plugins``: vLLM runs it in its engine and worker processes).
On a CPU whose build lacks the kernel, it puts a reference implementation in its place: each
layer's 4-bit weights are unpacked once, on first use, into a float32 matrix, and the layer is a
plain matmul from then on. Answers are those of the quantized model; the memory saving is not
(the checkpoint stays small on disk). Where vLLM has the kernel, nothing changes.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["register", "dequantize_cpu_wna16", "cpu_gemm_wna16_reference"]

_lock = threading.Lock()
_dense: dict[tuple[int, tuple[int, ...]], Any] = {}


def register() -> None:
    """vLLM general plugin: on CPU, route 4-bit matmuls to the reference when the kernel is missing.

    Safe to call many times and in any vLLM process; does nothing on other platforms.
    """
    from ..compat import current_platform, custom_ops

    try:
        ops = custom_ops()
        platform = current_platform()
    except Exception:  # vLLM without these pieces: nothing to do
        return
    if not platform.is_cpu():
        return
    native = getattr(ops, "cpu_gemm_wna16", None)
    if native is None or getattr(native, "_vllm_magic_reference", False):
        return

    def cpu_gemm_wna16(input: Any, q_weight: Any, scales: Any, zeros: Any, bias: Any, pack_factor: int,
                       isa_hint: str) -> Any:
        if _has_native_kernel():
            return native(input, q_weight, scales, zeros, bias, pack_factor, isa_hint)
        return cpu_gemm_wna16_reference(input, q_weight, scales, zeros, bias, pack_factor)

    cpu_gemm_wna16._vllm_magic_reference = True  # type: ignore[attr-defined]
    ops.cpu_gemm_wna16 = cpu_gemm_wna16


_native: bool | None = None


def _has_native_kernel() -> bool:
    # Asked at the first matmul, when vLLM has loaded its kernel library for this CPU.
    global _native
    if _native is None:
        import torch

        try:
            torch.ops._C.cpu_gemm_wna16
            _native = True
        except (AttributeError, RuntimeError):
            _native = False
    return _native


def dequantize_cpu_wna16(q_weight: Any, scales: Any, zeros: Any, pack_factor: int) -> Any:
    """The float32 weight [in, out] of a layer in vLLM's CPU int4 layout.

    vLLM prepares a layer for ``cpu_gemm_wna16`` as: ``q_weight`` [out/16, in*16/pack] int32, blocks
    of 16 output columns each holding every input row, levels packed along the output dimension
    (level j of an int32 in bits 4j..4j+3); ``scales`` [groups, out]; ``zeros`` [groups, out/pack]
    packed the same way, or None for symmetric weights (zero point at the middle level).
    """
    import torch

    bits = 32 // pack_factor
    mask = (1 << bits) - 1
    out_features = scales.shape[1]
    in_features = q_weight.numel() * pack_factor // out_features
    per_block = 16 // pack_factor
    packed = q_weight.reshape(out_features // 16, in_features, per_block).permute(1, 0, 2)
    packed = packed.reshape(in_features, out_features // pack_factor)
    levels = _unpack(packed, bits, mask)
    group = in_features // scales.shape[0]
    if zeros is None:
        zero = torch.full((1,), float(1 << (bits - 1)))
    else:
        zero = _unpack(zeros, bits, mask).float().repeat_interleave(group, dim=0)
    return (levels.float() - zero) * scales.float().repeat_interleave(group, dim=0)


def _unpack(packed: Any, bits: int, mask: int) -> Any:
    import torch

    rows, cols = packed.shape
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return ((packed.unsqueeze(-1) >> shifts) & mask).reshape(rows, cols * (32 // bits))


def cpu_gemm_wna16_reference(input: Any, q_weight: Any, scales: Any, zeros: Any, bias: Any,
                             pack_factor: int) -> Any:
    """``input @ W + bias`` for a layer in vLLM's CPU int4 layout, computed in float32."""
    import torch

    key = (q_weight.data_ptr(), tuple(q_weight.shape))
    weight = _dense.get(key)
    if weight is None:
        with _lock:
            weight = _dense.get(key)
            if weight is None:
                weight = dequantize_cpu_wna16(q_weight, scales, zeros, pack_factor).contiguous()
                _dense[key] = weight
    out = torch.matmul(input.float(), weight)
    if bias is not None:
        out += bias.float()
    return out.to(input.dtype)
