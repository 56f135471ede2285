"""Where vllm-magic keeps its files: one cache directory, the only place it writes on its own.

The cache is ``$VLLM_MAGIC_CACHE`` when set, else ``$XDG_CACHE_HOME/vllm-magic``, else
``~/.cache/vllm-magic``. In it:

* ``downloads/``: what was fetched to prepare a model (the demo model's wheel);
* ``logs/``: the engine logs of each kernel (``engine-PID.log``) and of the servers it started;
* one folder per prepared model (the demo model and its variants), named after the model, directly
  in the cache: caches prepared by earlier versions stay valid where they are.

Nothing here creates a directory: whoever writes there does.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_VARIABLE", "cache_dir", "downloads_dir", "logs_dir", "model_dir"]

#: The environment variable that moves the whole cache.
CACHE_VARIABLE = "VLLM_MAGIC_CACHE"


def cache_dir() -> Path:
    """The vllm-magic cache directory (not created)."""
    override = os.environ.get(CACHE_VARIABLE)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vllm-magic"


def downloads_dir(cache: Path | None = None) -> Path:
    """Where downloads made to prepare models are kept (in ``cache``, default :func:`cache_dir`)."""
    return (cache or cache_dir()) / "downloads"


def logs_dir(cache: Path | None = None) -> Path:
    """Where the engine and server logs are written (in ``cache``, default :func:`cache_dir`)."""
    return (cache or cache_dir()) / "logs"


def model_dir(name: str, cache: Path | None = None) -> Path:
    """Where the prepared model ``name`` lives (in ``cache``, default :func:`cache_dir`)."""
    return (cache or cache_dir()) / name
