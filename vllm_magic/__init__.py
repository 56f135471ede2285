"""vllm-magic: vLLM as a first-class citizen of Jupyter.

``%load_ext vllm_magic`` registers the magics. From Python, :func:`get_session` returns the kernel's
one engine session, and :func:`prepare_demo_model` the embedded demo model's directory.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .demo.model import DemoModelError, prepare_demo_model
from .engine import get_session
from .errors import VllmMagicError

__all__ = ["__version__", "get_session", "prepare_demo_model", "DemoModelError", "VllmMagicError",
           "load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython) -> None:
    """Register the magics (``%load_ext vllm_magic``)."""
    from .magics import register

    register(ipython)


def unload_ipython_extension(ipython) -> None:
    """Shut the engine down so ``%reload_ext`` and ``%unload_ext`` free its memory."""
    from .magics import unregister

    unregister(ipython)
