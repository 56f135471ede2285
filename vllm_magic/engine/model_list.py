"""``%vllm_models``: what this machine can load without a network, and whether vLLM runs it.

The rows are the Hugging Face cache's models (size on disk, architecture, unfinished downloads)
and the demo model with its variants (prepared or not). Whether vLLM runs an architecture is
asked of the installed vLLM's model registry; without vLLM that column says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..demo.model import DEMO_MODEL_NAME
from ..demo.variants import AWQ_MODEL_NAME, TINY_MODEL_NAME
from ..hub import cached_models, directory_size, format_bytes, hub_cache_dir

__all__ = ["ModelRow", "ModelList", "list_models"]

_DEMO_MODELS = (
    (DEMO_MODEL_NAME, "the demo model: %vllm_load with no model", "python -m vllm_magic demo-model"),
    (TINY_MODEL_NAME, "demo model for tensor parallel: prepare_tiny_model()", "python -m vllm_magic tiny-model"),
    (AWQ_MODEL_NAME, "demo model, 4-bit AWQ: prepare_awq_demo_model()", "python -m vllm_magic demo-model --awq"),
)


@dataclass(frozen=True)
class ModelRow:
    """One model this machine has (or can prepare)."""

    name: str
    size: int
    architecture: str
    #: "yes", "no", or why it cannot be told / loaded yet.
    runs: str
    where: str


@dataclass(frozen=True)
class ModelList:
    """The models of the Hugging Face cache and the demo models, as ``%vllm_models`` shows them."""

    rows: tuple[ModelRow, ...]
    cache: Path

    def _repr_markdown_(self) -> str:
        head = "| model | size | architecture | vLLM runs it | where |\n|---|---|---|---|---|\n"
        body = "".join(f"| `{r.name}` | {format_bytes(r.size) if r.size else ''} | {r.architecture} | {r.runs} | "
                       f"{r.where} |\n" for r in self.rows)
        return (f"**Models on this machine** (Hugging Face cache: `{self.cache}`)\n\n" + head + body)

    def __repr__(self) -> str:
        lines = [f"Models on this machine (Hugging Face cache: {self.cache})"]
        for r in self.rows:
            size = format_bytes(r.size) if r.size else "-"
            lines.append(f"  {r.name}  {size}  {r.architecture or '-'}  vLLM runs it: {r.runs}  {r.where}")
        return "\n".join(lines)


def list_models(download_dir: str | None = None) -> ModelList:
    """The models this machine holds: the Hugging Face cache's (``download_dir``, else the cache of
    ``HF_HOME``) and the demo models."""
    cache = hub_cache_dir(download_dir)
    supported = _supported()
    rows = []
    for model in cached_models(cache):
        architecture = ", ".join(model.architectures)
        if model.snapshot is None:
            runs = (f"not yet: {format_bytes(model.partial)} of an unfinished download (loading it resumes)"
                    if model.partial else "not yet: no complete snapshot")
        elif supported is None:
            runs = "unknown: vLLM is not installed here"
        elif not model.architectures:
            runs = "unknown: its config.json names no architecture"
        else:
            runs = "yes" if set(model.architectures) & supported else "no"
        rows.append(ModelRow(model.repo_id, model.size, architecture, runs, "Hub cache"))
    for name, what, prepare in _DEMO_MODELS:
        directory = paths.model_dir(name)
        prepared = (directory / "config.json").is_file()
        size = directory_size(directory) if prepared else 0
        where = f"{what}; {directory}" if prepared else f"{what}; not prepared ({prepare})"
        rows.append(ModelRow(name, size, "LlamaForCausalLM", "yes" if supported is None or
                             "LlamaForCausalLM" in supported else "no", where))
    return ModelList(tuple(rows), cache)


def _supported() -> frozenset[str] | None:
    from .compat import supported_architectures

    try:
        return supported_architectures()
    except Exception:  # noqa: BLE001 - vLLM missing or broken: the column says it cannot tell
        return None
