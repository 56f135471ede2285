"""The IPython front-end: ``%vllm_load``, ``%%vllm`` and friends (``commands``), what they show in
a cell (``display``), the value of a ``%%vllm`` cell (``results``) and how a cell body becomes
prompts (``cells``). Parsing and display only; the engine lives in :mod:`vllm_magic.engine`.
"""

from .commands import VllmMagics, register, sampling_args, unregister

__all__ = ["VllmMagics", "register", "unregister", "sampling_args"]
