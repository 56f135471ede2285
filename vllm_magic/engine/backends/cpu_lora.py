"""LoRA on CPUs: base-model tokens batched beside adapter tokens get no adapter.

vLLM marks a token that runs without an adapter with the LoRA index -1. Its GPU kernels skip such
tokens; the PyTorch ops its CPU platform uses instead (``vllm.lora.ops.torch_ops``) index the
stacked adapters with it, and ``weights[-1]`` is the last adapter slot. So on a CPU a request for
the base model that shares an engine step with an adapter's request is answered with that
adapter's delta: wrong text, no error (seen with vLLM 0.32; the upstream fix is not released).

vllm-magic registers :func:`register` as a vLLM general plugin (``vllm.general_plugins``: vLLM runs
it in its engine and worker processes). Where the installed ops still take index -1 for a slot, it
wraps them: rows without an adapter enter with a zero input, so the shrink writes zero and the
expand adds zero, which is what the GPU kernels' skip amounts to. Rows with an adapter are
computed exactly as before. Where vLLM's ops already skip such rows, nothing changes.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["register", "ops_apply_a_slot_to_base_tokens"]

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def register() -> None:
    """vLLM general plugin: make the CPU LoRA ops skip tokens without an adapter (index -1).

    Safe to call many times and in any vLLM process; does nothing where the ops are right already
    or vLLM has no such ops."""
    from ..compat import cpu_lora_op_modules

    try:
        lora_ops, torch_ops, punica_cpu = cpu_lora_op_modules()
    except Exception:  # a vLLM without the PyTorch LoRA ops: nothing to do
        return
    if getattr(lora_ops.bgmv_shrink, "_vllm_magic_skips_base", False):
        return
    if not ops_apply_a_slot_to_base_tokens(lora_ops.bgmv_shrink):
        return
    for name in _OPS:
        patched = _skipping_base_tokens(getattr(lora_ops, name))
        # sgmv_* call the bgmv_* of their own module; punica_cpu and the package imported them by name.
        for module in (lora_ops, torch_ops, punica_cpu):
            if hasattr(module, name):
                setattr(module, name, patched)


def ops_apply_a_slot_to_base_tokens(bgmv_shrink: Callable[..., Any]) -> bool:
    """Whether ``bgmv_shrink`` gives a token of index -1 a non-zero result (the last slot's)."""
    import torch

    inputs = torch.ones(1, 2)
    weights = torch.ones(1, 1, 3, 2)  # one adapter slot, rank 3, hidden size 2
    output = torch.zeros(1, 3)
    bgmv_shrink(inputs, weights, output, torch.tensor([-1]), 1.0)
    return bool(output.abs().sum() > 0)


def _skipping_base_tokens(op: Callable[..., Any]) -> Callable[..., Any]:
    def skipping(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kwargs: Any) -> Any:
        base = indices < 0
        if bool(base.any()):
            inputs = inputs.masked_fill(base.view(-1, *([1] * (inputs.dim() - 1))), 0)
            indices = indices.clamp(min=0)
        return op(inputs, weights, output, indices, *args, **kwargs)

    skipping._vllm_magic_skips_base = True  # type: ignore[attr-defined]
    skipping.__wrapped__ = op  # type: ignore[attr-defined]
    skipping.__name__ = getattr(op, "__name__", "lora_op")
    skipping.__doc__ = op.__doc__
    return skipping
