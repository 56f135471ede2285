"""The reference for LoRA answers: transformers and peft, float32 on the CPU, greedy.

``peft_greedy_ids`` decodes the way a greedy vLLM request does (``temperature=0``): it stops at the
model's end-of-turn token (the generation config's EOS ids) or after ``max_new_tokens``, and it
returns the new token ids only, the final EOS id included when it stopped on it, which is what
vLLM's ``CompletionOutput.token_ids`` holds. The two can then be compared token for token.
"""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=2)
def _model(model_dir: str, adapter_dir: str | None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def peft_greedy_ids(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None,
                    prompt_token_ids: list[int], max_new_tokens: int) -> list[int]:
    """The token ids greedy decoding adds to ``prompt_token_ids``: the model in ``model_dir`` with
    the peft adapter in ``adapter_dir`` (None: the model alone)."""
    import torch

    model = _model(os.fspath(model_dir), None if adapter_dir is None else os.fspath(adapter_dir))
    config = model.generation_config
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    prompt = torch.tensor([list(prompt_token_ids)])
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos[0],
                             temperature=None, top_p=None, top_k=None)
    new = out[0, prompt.shape[1]:].tolist()
    # generate() pads a finished sequence only in a batch; one sequence ends at its EOS.
    for i, token in enumerate(new):
        if token in eos:
            return new[:i + 1]
    return new
