"""LoRA adapters: what a directory holds, whether an engine can run it, and the names requests use.

An adapter is registered under a name (``%vllm_lora NAME PATH``, ``session.add_lora``) with the
engine that runs it, and a request names it (``%%vllm --lora NAME``, ``VLLM(lora=NAME)``,
``session.submit(..., lora=NAME)``); :data:`BASE` names no adapter (the model as it is), so that a
grid can put the base model beside its adapters (``--grid lora=base,NAME``). Everything that can be
read from the files (peft's ``adapter_config.json`` and the weights' shapes) is checked here, before
the engine sees the adapter, so that each mistake is one line and the engine keeps serving.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ...errors import RequestError

__all__ = ["Adapter", "AdapterError", "BASE", "read_adapter", "check_name", "check_fits", "unknown_adapter",
           "adapter_names", "max_rank_for", "engine_args_for"]

#: The name that asks for no adapter: the base model.
BASE = "base"


class AdapterError(RequestError):
    """A LoRA adapter cannot be registered or used as asked."""


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter as an engine knows it."""

    name: str
    #: Where its files are (a directory for an engine here; a server's own path for a server's).
    path: str
    #: Its LoRA rank (``r``), or None where unknown (a server's adapter).
    rank: int | None = None
    #: The base model it was trained on (peft's ``base_model_name_or_path``), or None.
    base_model: str | None = None
    #: The layers it changes (peft's ``target_modules``).
    target_modules: tuple[str, ...] = ()
    #: Its engine's number for it (vLLM's ``lora_int_id``, 1 or more); 0 for a server's adapter.
    engine_id: int = 0
    #: Where it came from: ``"registered"`` here, or ``"server"`` (named when the server started).
    origin: str = "registered"
    #: The hidden size its weights expect, where they say (checked against the model's).
    hidden_size: int | None = field(default=None, compare=False)

    @property
    def summary(self) -> str:
        """One line for status lists: ``pirate (rank 8, from /path)``."""
        parts = [f"rank {self.rank}"] if self.rank else []
        parts.append("named by the server" if self.origin == "server" else f"from {self.path}")
        return f"{self.name} ({', '.join(parts)})"


def check_name(name: Any) -> str:
    """A name requests can use: not empty, no spaces or commas (grids list names with commas), not
    :data:`BASE`."""
    if not isinstance(name, str) or not name.strip():
        raise AdapterError(f"an adapter's name is a word such as 'pirate', not {name!r}")
    if name == BASE:
        raise AdapterError(f"'{BASE}' names the model without an adapter: choose another name")
    if any(c.isspace() or c in ",=" for c in name):
        raise AdapterError(f"an adapter's name has no spaces, commas or '=': {name!r}")
    return name


def read_adapter(name: str, path: str | os.PathLike) -> Adapter:
    """The adapter in ``path`` (a directory written by peft's ``save_pretrained``), read without
    loading any weight; :class:`AdapterError` in one line for a path that is not a LoRA adapter."""
    name = check_name(name)
    directory = Path(os.path.expanduser(os.fspath(path)))
    if not directory.is_dir():
        raise AdapterError(f"no such adapter directory: {path}")
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        looks = " (it holds a whole model: load it with %vllm_load)" if (directory / "config.json").is_file() else ""
        raise AdapterError(f"{path} is not a LoRA adapter: it has no adapter_config.json{looks}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{config_file} cannot be read: {exc}") from None
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise AdapterError(f"{path} is a {kind} adapter; vLLM runs LoRA adapters only")
    weights = [directory / f for f in ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")]
    if not any(w.is_file() for w in weights):
        raise AdapterError(f"{path} is not a LoRA adapter: it has no adapter_model.safetensors (or .bin)")
    rank = config.get("r")
    targets = config.get("target_modules") or ()
    targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
    return Adapter(name=name, path=str(directory.resolve()), rank=int(rank) if rank else None,
                   base_model=config.get("base_model_name_or_path") or None, target_modules=targets,
                   hidden_size=_hidden_size(weights[0]))


def check_fits(adapter: Adapter, *, max_rank: int | None, model: str, model_names: tuple[str, ...],
               hidden_size: int | None, any_base: bool = False) -> None:
    """Refuse, in one line, an adapter the engine cannot run: a rank over the engine's
    ``max_lora_rank``, weights for another hidden size, or (unless ``any_base``) a base model of
    another name than any of ``model_names`` (the engine's model: its Hub id, directory, name)."""
    if max_rank is not None and adapter.rank is not None and adapter.rank > max_rank:
        raise AdapterError(f"adapter {adapter.name} has rank {adapter.rank}, over this engine's --max-lora-rank "
                           f"{max_rank}; load the model with --max-lora-rank {_rank_at_least(adapter.rank)}")
    base = adapter.base_model
    if hidden_size is not None and adapter.hidden_size is not None and adapter.hidden_size != hidden_size:
        made_for = f"for {base} " if base else ""
        raise AdapterError(f"adapter {adapter.name} was made {made_for}(hidden size {adapter.hidden_size}), and "
                           f"this engine runs {model} (hidden size {hidden_size})")
    if base and not any_base and _model_name(base) not in {_model_name(n) for n in model_names if n}:
        raise AdapterError(f"adapter {adapter.name} was trained on {base}, and this engine runs {model}; "
                           "register it with --any-base if it is the same model under another name")


def unknown_adapter(name: str, known: list[str]) -> AdapterError:
    """The one line for a request naming an adapter the engine does not have."""
    have = ", ".join(known) if known else "none yet"
    return AdapterError(f"no adapter named {name!r} (registered: {have}; '{BASE}' is the model without one); "
                        "add one with %vllm_lora NAME PATH")


def adapter_names(value: Any) -> str | None:
    """A request's adapter name: None and :data:`BASE` ask for none."""
    if value is None or value == BASE:
        return None
    if not isinstance(value, str) or not value:
        raise AdapterError(f"--lora (lora) names a registered adapter, not {value!r}")
    return value


def _model_name(name: str) -> str:
    """A model's name without its folders or Hub organisation, for comparing bases."""
    return os.path.basename(os.path.normpath(str(name))).lower()


def engine_args_for(adapters: Sequence[Adapter]) -> dict[str, Any]:
    """The engine arguments that run these adapters: ``enable_lora``, and a ``max_lora_rank`` over
    vLLM's default (16) where one of their ranks needs it."""
    args: dict[str, Any] = {"enable_lora": True}
    ranks = [adapter.rank for adapter in adapters if adapter.rank is not None]
    if ranks and max(ranks) > 16:
        args["max_lora_rank"] = max_rank_for(max(ranks))
    return args


def max_rank_for(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that runs an adapter of ``rank``."""
    return _rank_at_least(rank)


def _rank_at_least(rank: int) -> int:
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):  # vLLM's accepted max_lora_rank values
        if allowed >= rank:
            return allowed
    return rank


def _hidden_size(weights: Path) -> int | None:
    """The hidden size a safetensors adapter's weights expect (``lora_A`` of an attention input
    projection is ``rank x hidden``), read from the file's header; None where it does not say."""
    if weights.suffix != ".safetensors" or not weights.is_file():
        return None
    try:
        with open(weights, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return None
    for key, info in header.items():
        if key.endswith(("q_proj.lora_A.weight", "qkv_proj.lora_A.weight")) and isinstance(info, dict):
            shape = info.get("shape") or ()
            return int(shape[1]) if len(shape) == 2 else None
    return None
