"""Notebooks sharing one NVIDIA GPU: each engine takes what its work needs, not 92% of the card.

Real kernels started by jupyter_client, as two open notebooks are, beside the suite's own engine.
"""

from __future__ import annotations

import re

import pytest

from real_kernel import RealKernel
from vllm_magic.engine import gpu_memory
from vllm_magic.engine.session import EngineSession

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1800)]

SETUP = "%load_ext vllm_magic\n%config VllmMagics.show_controls = False\n%vllm_load"
QUESTION = "%%vllm -t 0 -m 12 --quiet\nWhat is the capital of France?"
MEMORY = ("from vllm_magic import get_session\n"
          "_s = get_session().status()\n"
          "print('held', _s.memory_bytes, '|', _s.gpu)")


def test_two_kernels_each_load_the_demo_model_beside_the_suites_engine_and_answer(engine, tmp_path):
    kernels = []
    try:
        for name in ("first", "second"):
            (tmp_path / name).mkdir()
            kernel = RealKernel(tmp_path / name)
            kernels.append(kernel)
            assert "loaded on cuda" in kernel.ok(SETUP)
        for kernel in kernels:
            assert "Paris" in kernel.ok(QUESTION)
        held = []
        for kernel in kernels:
            shown = kernel.ok(MEMORY)
            held.append(int(re.search(r"held (\d+)", shown).group(1)))
            assert "KV cache" in shown and "sequences of" in shown and "GiB free" in shown
        card = gpu_memory.cards()[0]
        # each engine holds its weights and a KV cache of a few GiB: far from vLLM's 92% of the card
        assert all(0 < h < card.total * 0.25 for h in held), (held, card)
        print("two kernels on one GPU:", [f"{h / 2**30:.2f} GiB" for h in held], card.describe())
    finally:
        for kernel in kernels:
            kernel.shutdown()


def test_a_load_that_cannot_fit_says_so_in_one_line_naming_the_holders_and_the_engine_stays(engine):
    free = gpu_memory.cards()[0].free
    own = EngineSession()
    with pytest.raises(gpu_memory.DoesNotFit) as caught:
        own.load(kv_cache_memory_bytes=free + (8 << 30))
    message = str(caught.value)
    assert "\n" not in message
    assert "does not fit on GPU 0" in message and "GiB are free, held by" in message
    assert "this kernel" in message  # the suite's engine, a child of this process
    assert not own.loaded
    assert "Paris" in engine.generate("What is the capital of France?", temperature=0, max_tokens=12).text
