"""The IPython front-end: ``%vllm_load``, ``%%vllm`` and friends (``commands``: routing), reading
their lines (``args``), a cell's streamed answer (``answer``), what they show in a cell
(``display``), the value of a ``%%vllm`` cell (``results``) and how a cell body becomes prompts
(``cells``). The engine lives in :mod:`vllm_magic.engine`.
"""

from .args import sampling_args
from .commands import VllmMagics, register, unregister

__all__ = ["VllmMagics", "register", "unregister", "sampling_args"]
