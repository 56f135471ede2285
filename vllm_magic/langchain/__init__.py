"""The live engine as LangChain models: ``VLLM`` (an LLM) and ``ChatVLLM`` (a chat model), and the
embedding engine as ``VLLMEmbeddings`` (``%vllm_load --embed``).

``VLLM`` is a drop-in for ``langchain_community.llms.VLLM`` (same constructor fields), but it
never builds an engine of its own: it attaches to the kernel's engine, or loads its configuration
through the session (replacing the live engine). Sampling fields left unset follow the session's
defaults (the sampling widgets, ``%config``); fields you set, and call-time arguments, win.

>>> from vllm_magic.langchain import VLLM
>>> llm = VLLM(model="SmolLM2-135M-Instruct", max_new_tokens=128, temperature=0.8)  # doctest: +SKIP
>>> llm.invoke("What is the capital of France ?")  # doctest: +SKIP
"""

from .chat import ChatVLLM
from .embeddings import VLLMEmbeddings
from .llm import VLLM

__all__ = ["VLLM", "ChatVLLM", "VLLMEmbeddings"]
