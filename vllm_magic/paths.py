"""Where vllm-magic keeps its files: one cache directory, the only place it writes on its own.

The cache is ``$VLLM_MAGIC_CACHE`` when set, else ``$XDG_CACHE_HOME/vllm-magic``, else
``~/.cache/vllm-magic``. In it:

* ``downloads/``: what was fetched to prepare a model (the demo model's wheel);
* ``logs/``: the engine logs of each kernel (``engine-PID.log``) and of the servers it started;
* one folder per prepared model (the demo model and its variants), named after the model, directly
  in the cache: caches prepared by earlier versions stay valid where they are;
* ``adapters/``: one folder per prepared LoRA adapter (the demo adapter), named after it.

Nothing here creates a cache directory: whoever writes there does. The runtime directory
(:func:`runtime_dir`) is the exception: it holds the sockets and keys of engines that outlive their
kernel, so it is created private to the user (0700) and checked on every use.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

__all__ = ["CACHE_VARIABLE", "RUNTIME_VARIABLE", "adapter_dir", "cache_dir", "downloads_dir", "logs_dir",
           "model_dir", "runtime_dir"]

#: The environment variable that moves the whole cache.
CACHE_VARIABLE = "VLLM_MAGIC_CACHE"
#: The environment variable that moves the runtime directory (persisted engines' sockets and keys).
RUNTIME_VARIABLE = "VLLM_MAGIC_RUNTIME"


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


def adapter_dir(name: str, cache: Path | None = None) -> Path:
    """Where the prepared LoRA adapter ``name`` lives (in ``cache``, default :func:`cache_dir`)."""
    return (cache or cache_dir()) / "adapters" / name


def runtime_dir() -> Path:
    """The user's private directory for engines that outlive their kernel, created 0700.

    ``$VLLM_MAGIC_RUNTIME`` when set, else ``$XDG_RUNTIME_DIR/vllm-magic``, else
    ``vllm-magic-UID`` in the system's temporary directory (short: a Unix socket's path has at
    most 107 bytes). A directory that another user owns, or that others may enter, is refused:
    whoever can enter it could talk to the engines.
    """
    override = os.environ.get(RUNTIME_VARIABLE)
    if override:
        path = Path(override).expanduser()
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "vllm-magic"
    else:
        path = Path(tempfile.gettempdir()) / f"vllm-magic-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(f"{path} is not a directory of this user: set ${RUNTIME_VARIABLE} to one")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours, but others could enter it: close it before anything goes in
    return path
