"""The Hugging Face cache on this machine, read without any network call.

huggingface_hub keeps a model as ``models--ORG--NAME/`` in the cache: ``blobs/`` (each file once, by
its hash; ``NAME.incomplete`` while it downloads), ``refs/main`` (the commit a branch pointed at when
it was fetched) and ``snapshots/COMMIT/`` (the repository's files, links into ``blobs``). A snapshot
whose configuration and every weight file are there is a model vLLM can load as a local directory:
:func:`cached_snapshot` finds it the way ``HF_HUB_OFFLINE=1`` would, without asking the Hub.

The cache directory is read from the environment at call time (``HF_HUB_CACHE``, ``HF_HOME``,
``XDG_CACHE_HOME``), so a notebook that sets ``os.environ["HF_HOME"]`` after importing anything
still gets the cache it named.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CachedModel", "cached_models", "cached_snapshot", "directory_size", "hub_cache_dir", "is_hub_model",
           "is_repo_id", "local_snapshot", "repo_folder",
           "WEIGHT_SUFFIXES"]

#: Files that hold a model's weights, in the order vLLM prefers them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_repo_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub repository id (``org/name``), not a path."""
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name


def is_hub_model(name: str) -> bool:
    """Whether ``name`` names a Hub model: an ``org/name`` id that is not a local directory."""
    return is_repo_id(name) and not os.path.isdir(os.path.expanduser(name))


def hub_cache_dir(download_dir: str | os.PathLike | None = None) -> Path:
    """Where huggingface_hub keeps models: ``download_dir`` (vLLM's ``--download-dir``) when given,
    else ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
    ``~/.cache/huggingface/hub``."""
    if download_dir:
        return Path(download_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "huggingface" / "hub"


def repo_folder(repo_id: str, cache: Path) -> Path:
    """The cache folder of a model repository."""
    return cache / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, revision: str | None = None, cache: Path | None = None) -> Path | None:
    """The cached snapshot of ``repo_id`` at ``revision`` (default: the branch ``main``) when it holds a
    complete model (``config.json`` and every weight file), else None. No network call is made."""
    folder = repo_folder(repo_id, cache or hub_cache_dir())
    commit = revision if revision and _COMMIT.fullmatch(revision) else _read_ref(folder, revision or "main")
    if commit is None:
        return None
    snapshot = folder / "snapshots" / commit
    return snapshot if complete_model(snapshot) else None


def local_snapshot(model: str, revision: str | None = None,
                   download_dir: str | os.PathLike | None = None) -> Path | None:
    """The complete cached snapshot of a Hub model in the cache ``download_dir`` names (see
    :func:`hub_cache_dir`); None for a model that is not a Hub model or not complete there."""
    if not is_hub_model(model):
        return None
    return cached_snapshot(model, revision, hub_cache_dir(download_dir))


def complete_model(directory: Path) -> bool:
    """Whether ``directory`` holds a loadable model: its config and all its weights (every shard a
    weight index names; else at least one weight file), each link resolving to a file."""
    if not (directory / "config.json").is_file():
        return False
    indexes = [_shards(index) for index in directory.glob("*.index.json")]
    if any(indexes):  # a repository may carry several formats: one of them complete is enough
        return any(shards and all((directory / shard).is_file() for shard in shards) for shards in indexes)
    return any(f.is_file() for f in directory.iterdir() if f.name.endswith(WEIGHT_SUFFIXES))


def _shards(index: Path) -> set[str]:
    try:
        return set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def directory_size(directory: str | os.PathLike) -> int:
    """Bytes of the files in ``directory`` (links followed: a snapshot's files are links into blobs)."""
    total = 0
    for path in Path(directory).rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:
            continue
    return total


def _read_ref(folder: Path, revision: str) -> str | None:
    try:
        commit = (folder / "refs" / revision).read_text().strip()
    except OSError:
        return None
    return commit if _COMMIT.fullmatch(commit) else None


@dataclass(frozen=True)
class CachedModel:
    """A model repository in the local cache."""

    repo_id: str
    #: Bytes of the repository's files in the cache (every revision, partial downloads included).
    size: int
    #: The newest complete snapshot, or None when no revision is complete.
    snapshot: Path | None
    #: ``architectures`` of its config.json ([] when unknown).
    architectures: tuple[str, ...]
    #: Bytes of unfinished downloads (``.incomplete`` blobs) a later download resumes.
    partial: int = 0


def cached_models(cache: Path | None = None) -> list[CachedModel]:
    """The model repositories in the cache, by name."""
    root = cache or hub_cache_dir()
    found = []
    for folder in sorted(root.glob("models--*")):
        repo_id = folder.name[len("models--"):].replace("--", "/")
        blobs = [f for f in (folder / "blobs").glob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in blobs)
        partial = sum(f.stat().st_size for f in blobs if f.name.endswith(".incomplete"))
        snapshots = [s for s in (folder / "snapshots").glob("*") if complete_model(s)]
        snapshot = max(snapshots, key=lambda s: s.stat().st_mtime) if snapshots else None
        found.append(CachedModel(repo_id, size, snapshot, _architectures(snapshot), partial))
    return found


def _architectures(snapshot: Path | None) -> tuple[str, ...]:
    if snapshot is None:
        return ()
    try:
        return tuple(json.loads((snapshot / "config.json").read_text()).get("architectures") or ())
    except (OSError, ValueError, AttributeError):
        return ()
