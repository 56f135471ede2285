"""The CPU LoRA ops plugin: tokens without an adapter (index -1) get no adapter's delta (pure torch)."""

from __future__ import annotations

import torch

from vllm_magic.engine.backends.cpu_lora import ops_apply_a_slot_to_base_tokens, register
from vllm_magic.engine.compat import cpu_lora_op_modules


def test_cpu_lora_ops_give_tokens_without_an_adapter_no_delta_and_others_the_same_as_before():
    lora_ops, torch_ops, punica_cpu = cpu_lora_op_modules()
    register()
    register()  # a second call (every vLLM process runs it) wraps nothing twice
    assert not ops_apply_a_slot_to_base_tokens(lora_ops.bgmv_shrink)
    assert punica_cpu.bgmv_shrink is lora_ops.bgmv_shrink is torch_ops.bgmv_shrink
    assert not getattr(lora_ops.bgmv_shrink.__wrapped__, "_vllm_magic_skips_base", False)

    torch.manual_seed(0)
    x = torch.randn(3, 4)
    a = torch.randn(2, 1, 5, 4)  # two adapter slots, rank 5, hidden size 4
    b = torch.randn(2, 1, 4, 5)
    indices = torch.tensor([0, -1, 1])
    shrunk = torch.zeros(3, 5)
    lora_ops.bgmv_shrink(x, a, shrunk, indices, 0.5)
    assert torch.equal(shrunk[1], torch.zeros(5))
    assert torch.allclose(shrunk[0], 0.5 * a[0, 0] @ x[0]) and torch.allclose(shrunk[2], 0.5 * a[1, 0] @ x[2])
    out = torch.ones(3, 4)
    lora_ops.bgmv_expand(shrunk, b, out, indices, True)
    assert torch.equal(out[1], torch.ones(4))
    assert torch.allclose(out[0], 1 + b[0, 0] @ shrunk[0]) and torch.allclose(out[2], 1 + b[1, 0] @ shrunk[2])
    # Prefill: one index per sequence, expanded over its tokens (sgmv calls the wrapped bgmv).
    prefill = torch.zeros(3, 5)
    lora_ops.sgmv_shrink(x, a, prefill, torch.tensor([0, 2]), torch.tensor([2, 1]), torch.tensor([-1, 1]),
                         2, 2, 3, 1.0)
    assert torch.equal(prefill[:2], torch.zeros(2, 5)) and torch.allclose(prefill[2], a[1, 0] @ x[2])
