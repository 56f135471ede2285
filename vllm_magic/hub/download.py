"""Get a Hub model onto this machine before its engine starts, the way users expect.

* A model whose snapshot is complete in the local cache is used as it is: no network call at all
  (what ``HF_HUB_OFFLINE=1`` gives, found out rather than required).
* Otherwise one request for the Hub's model info (file sizes and hashes, a short timeout) decides:
  an unreachable Hub, a gated or private repository without a token, a name or revision that does
  not exist, or a disk too small are each one line, before a byte is downloaded.
* The download runs in a child process (:mod:`.worker`): the files vLLM loads (configuration,
  tokenizer, one weight format), into the standard cache (``HF_HOME``, or vLLM's
  ``download_dir``) in huggingface_hub's layout, with ``HF_TOKEN`` and the revision. Progress is
  read from the cache on disk (bytes and files done, rate, time left). Ctrl-C ends the child at
  once; what it wrote stays as ``.incomplete`` files, and the next download resumes from there
  with HTTP range requests.

Everything the engine gets afterwards is a local directory (the snapshot), so vLLM never reaches
for the network itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, urlparse

from ..errors import VllmMagicError
from .cache import WEIGHT_SUFFIXES, cached_snapshot, complete_model, hub_cache_dir, repo_folder

__all__ = ["DownloadPlan", "HubError", "DownloadInterrupted", "fetch", "plan_download", "hub_endpoint",
           "hub_token", "format_bytes"]

DEFAULT_ENDPOINT = "https://huggingface.co"
#: Seconds the metadata request may take: an unreachable Hub is reported in seconds, not minutes.
METADATA_TIMEOUT = 10.0
#: Room left free on the cache's disk after a download.
DISK_MARGIN = 512 * 1024 ** 2
#: Files besides the weights that vLLM reads from a repository (configuration, tokenizer, chat
#: template, a model's own code for ``trust_remote_code``).
_SIDE_FILES = (".json", ".jinja", ".txt", ".model", ".tiktoken", ".py", ".vocab")
#: Weight files that are not the model's weights.
_NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")

class HubError(VllmMagicError):
    """A model could not be had from the Hub: unreachable, gated, missing, no room on disk, or the
    download failed. The message says which, and what to do; nothing was started."""


class DownloadInterrupted(HubError, KeyboardInterrupt):
    """Ctrl-C during a download: the download stopped, what it wrote stays in the cache for the next
    one to resume. A ``KeyboardInterrupt`` too, so code that stops on Ctrl-C still stops."""


def hub_endpoint() -> str:
    """The Hub's address: ``$HF_ENDPOINT`` (a mirror, or a local stand-in), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_token() -> str | None:
    """The user's Hub token: ``$HF_TOKEN``, else the file ``hf auth login`` writes."""
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(variable):
            return os.environ[variable].strip()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    path = os.environ.get("HF_TOKEN_PATH") or os.path.join(home, "token")
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def format_bytes(size: float) -> str:
    """``538.1 MB``, ``16.1 GB``: decimal units, as the Hub shows sizes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


@dataclass(frozen=True)
class PlannedFile:
    """One file to download: its name in the repository, size, and blob name in the cache."""

    name: str
    size: int
    blob: str | None


@dataclass(frozen=True)
class DownloadPlan:
    """What a download of one repository revision fetches, and where it lands."""

    repo_id: str
    revision: str
    commit: str
    cache: Path
    endpoint: str
    files: tuple[PlannedFile, ...]

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def folder(self) -> Path:
        return repo_folder(self.repo_id, self.cache)

    @property
    def snapshot(self) -> Path:
        return self.folder / "snapshots" / self.commit

    def done(self) -> tuple[int, int]:
        """``(bytes, files)`` on disk now: finished files whole, unfinished ones as far as written."""
        written = finished = 0
        for file in self.files:
            size = _file_size(self.snapshot / file.name)
            if size is None and file.blob:
                size = _file_size(self.folder / "blobs" / file.blob)
            if size is not None:
                written += min(size, file.size)
                finished += 1
            elif file.blob:
                written += min(_file_size(self.folder / "blobs" / (file.blob + ".incomplete")) or 0, file.size)
        return written, finished

    def missing_bytes(self) -> int:
        return self.total - self.done()[0]


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size  # follows the snapshot's links into blobs
    except OSError:
        return None


# ----- the metadata request ---------------------------------------------------------------------

def plan_download(repo_id: str, revision: str | None = None, cache: Path | None = None,
                  token: str | None = None) -> DownloadPlan:
    """Ask the Hub what downloading ``repo_id`` at ``revision`` means (one request, the Hub's model
    info with file sizes); :class:`HubError` in one line when it cannot be had."""
    import httpx

    cache = cache or hub_cache_dir()
    endpoint = hub_endpoint()
    path = f"/api/models/{repo_id}" + (f"/revision/{quote(revision, safe='')}" if revision else "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        answer = httpx.get(endpoint + path, params={"blobs": "true"}, headers=headers, timeout=METADATA_TIMEOUT,
                           follow_redirects=True)
    except httpx.HTTPError as exc:
        raise HubError(_unreachable(repo_id, cache, _host(endpoint), _reason(exc))) from None
    if answer.status_code != 200:
        raise _refusal(answer.status_code, answer.headers.get("X-Error-Code", ""), repo_id, revision, endpoint,
                       token)
    try:
        info = answer.json()
        siblings = [(s["rfilename"], int(s.get("size") or 0), _blob_name(s)) for s in info.get("siblings") or []]
        commit = info["sha"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise HubError(f"{_host(endpoint)} answered with something other than the Hub's model info for {repo_id}: "
                       "is HF_ENDPOINT a Hugging Face Hub?") from None
    if info.get("gated") and not token:
        raise _refusal(401, "GatedRepo", repo_id, revision, endpoint, token)
    names = _files_to_fetch(repo_id, [name for name, _, _ in siblings])
    files = tuple(PlannedFile(name, size, blob) for name, size, blob in siblings if name in names)
    return DownloadPlan(repo_id, revision or "main", commit, cache, endpoint, files)


def _blob_name(sibling: dict[str, Any]) -> str | None:
    """The file's name in ``blobs/``: the sha256 of a large (LFS) file, else its git blob id."""
    lfs = sibling.get("lfs") or {}
    return lfs.get("sha256") or lfs.get("oid") or sibling.get("blobId")


def _files_to_fetch(repo_id: str, names: list[str]) -> set[str]:
    """The repository's top-level files vLLM loads: configuration and tokenizer files, and one weight
    format (safetensors before PyTorch's .bin and .pt; Mistral's ``consolidated`` copy left out
    when the usual shards are there)."""
    top = [n for n in names if "/" not in n]
    weights: list[str] = []
    for suffix in WEIGHT_SUFFIXES:
        weights = [n for n in top if n.endswith(suffix) and n not in _NOT_WEIGHTS]
        usual = [n for n in weights if not n.startswith("consolidated")]
        weights = usual or weights
        if weights:
            break
    if not weights:
        if any(n.endswith(".gguf") for n in names):
            raise HubError(f"{repo_id} holds GGUF files, one per quantization: download the one you want "
                           "(hf download REPO FILE.gguf) and load its path")
        raise HubError(f"{repo_id} has no weights vLLM loads (.safetensors, .bin or .pt files)")
    return set(weights) | {n for n in top if n.endswith(_SIDE_FILES)}


def _host(endpoint: str) -> str:
    return urlparse(endpoint).netloc or endpoint


def _refusal(status: int, code: str, repo_id: str, revision: str | None, endpoint: str, token: str | None) -> HubError:
    """The Hub's refusal (its HTTP status and ``X-Error-Code``) as one line saying what to do."""
    host = _host(endpoint)
    if code == "GatedRepo" or (status in (401, 403) and code != "RepoNotFound"):
        if token:
            return HubError(f"{repo_id} is gated or private and the token in use (HF_TOKEN) has no access to it: "
                            f"ask for access on {endpoint}/{repo_id}, or use a token of an account that has it")
        return HubError(f"{repo_id} is gated or private: accept its terms on {endpoint}/{repo_id}, then set "
                        "HF_TOKEN to a token of your account (or run `hf auth login`)")
    if code == "RevisionNotFound":
        return HubError(f"{repo_id} has no revision {revision!r} on {host}")
    if code in ("RepoNotFound", "EntryNotFound") or status in (401, 404):
        hint = "check the name" + ("" if token else "; a private model needs HF_TOKEN")
        return HubError(f"no model {repo_id} on {host}: {hint}")
    return HubError(f"{host} refused to describe {repo_id} (HTTP {status}{', ' + code if code else ''}); "
                    "try again later")


def _unreachable(repo_id: str, cache: Path, host: str, reason: str) -> str:
    partial = sum(f.stat().st_size for f in (repo_folder(repo_id, cache) / "blobs").glob("*.incomplete"))
    kept = f" ({format_bytes(partial)} of an unfinished download are there)" if partial else ""
    return (f"{repo_id} is not in the Hugging Face cache ({cache}){kept} and {host} cannot be reached ({reason}): "
            f"download it where there is network (python -m vllm_magic download {repo_id}, into the same "
            "HF_HOME), load a local directory instead, or set HF_ENDPOINT to a mirror you can reach")


def _reason(exc: BaseException) -> str:
    """The innermost cause of a network failure in a few words."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "Name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text:
        return "its name does not resolve: no network?"
    if "Connection refused" in text:
        return "connection refused"
    if "timed out" in text.lower():
        return f"no answer within {METADATA_TIMEOUT:.0f} s"
    return text[:120]


# ----- the download ------------------------------------------------------------------------------

def check_disk(plan: DownloadPlan) -> None:
    """:class:`HubError` when the cache's disk cannot take what is left to download."""
    needed = plan.missing_bytes()
    where = plan.cache
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed + DISK_MARGIN > free:
        raise HubError(f"{plan.repo_id} needs {format_bytes(needed)} more in {plan.cache} and "
                       f"{format_bytes(free)} are free there: free some space, or point HF_HOME (or "
                       "--download-dir) at a larger disk")


def fetch(repo_id: str, revision: str | None = None, download_dir: str | os.PathLike | None = None,
          progress: Callable[[str, float], None] | None = None) -> Path:
    """The local snapshot of ``repo_id`` at ``revision``: the cached one when complete (no network),
    else downloaded now, calling ``progress(stage, elapsed)`` about twice a second. Raises
    :class:`HubError` in one line, :class:`DownloadInterrupted` on Ctrl-C."""
    cache = hub_cache_dir(download_dir)
    found = cached_snapshot(repo_id, revision, cache)
    if found is not None:
        return found
    if _offline():
        raise HubError(f"{repo_id} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set, which "
                       "forbids downloading it: unset it where there is network, or load a local directory")
    token = hub_token()
    plan = plan_download(repo_id, revision, cache, token)
    if complete_model(plan.snapshot):  # downloaded before under another name of the same commit
        _write_ref(plan)
        return plan.snapshot
    check_disk(plan)
    return _download(plan, token, progress)


def _download(plan: DownloadPlan, token: str | None, progress: Callable[[str, float], None] | None) -> Path:
    request = {"repo_id": plan.repo_id, "commit": plan.commit, "cache": str(plan.cache), "endpoint": plan.endpoint,
               "files": [{"name": f.name, "size": f.size, "blob": f.blob} for f in plan.files]}
    package_root = str(Path(__file__).resolve().parents[2])  # this vllm_magic, installed or not
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token  # not on the command line, where `ps` shows it to everyone
    start = time.monotonic()
    rate = _Rate(plan.done()[0])
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen([sys.executable, "-m", "vllm_magic.hub.worker", json.dumps(request)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors, env=env,
                                 start_new_session=True)  # Ctrl-C is the parent's to handle
        try:
            while True:
                try:
                    child.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if progress is not None:
                    progress(_stage(plan, rate), time.monotonic() - start)
        except BaseException as exc:
            _end(child)
            if isinstance(exc, KeyboardInterrupt):
                written = plan.done()[0]
                raise DownloadInterrupted(
                    f"download of {plan.repo_id} interrupted at {format_bytes(written)} of "
                    f"{format_bytes(plan.total)}; what it wrote stays in the cache and loading it again resumes "
                    "the download") from None
            raise
        outcome = _outcome(child.stdout.read().decode(errors="replace"))
        child.stdout.close()
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    if "error" in outcome or child.returncode != 0:
        raise _download_error(plan, outcome, stderr)
    _write_ref(plan)
    if not complete_model(plan.snapshot):
        raise HubError(f"the download of {plan.repo_id} ended without all of the model's files in "
                       f"{plan.snapshot}; run it again")
    return plan.snapshot


def _stage(plan: DownloadPlan, rate: "_Rate") -> str:
    written, finished = plan.done()
    speed = rate.add(written)
    parts = [f"downloading {plan.repo_id}: {format_bytes(written)} of {format_bytes(plan.total)}",
             f"{finished} of {len(plan.files)} files"]
    if speed > 0:
        parts.append(f"{format_bytes(speed)}/s")
        parts.append(f"{_duration((plan.total - written) / speed)} left")
    return " · ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


class _Rate:
    """Bytes per second over the last few seconds of samples."""

    def __init__(self, written: int, window: float = 5.0) -> None:
        self._samples: deque[tuple[float, int]] = deque([(time.monotonic(), written)])
        self._window = window

    def add(self, written: int) -> float:
        now = time.monotonic()
        self._samples.append((now, written))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window:
            self._samples.popleft()
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 - t0 >= 1.0 else 0.0  # under a second of samples: no rate yet


def _end(child: subprocess.Popen) -> None:
    """Stop the download now: its group gets SIGKILL (the .incomplete files stay for the next one)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if child.stdout is not None:
        child.stdout.close()


def _outcome(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {"error": "other", "message": ""}


def _download_error(plan: DownloadPlan, outcome: dict[str, Any], stderr: str) -> HubError:
    kind, message = outcome.get("error", "other"), str(outcome.get("message", ""))
    written = plan.done()[0]
    kept = (f"{format_bytes(written)} of {format_bytes(plan.total)} stay in the cache and loading it again resumes "
            "the download")
    if kind == "disk":
        return HubError(f"the disk of {plan.cache} filled up while downloading {plan.repo_id}: free some space "
                        "(or point HF_HOME at a larger disk); loading it again resumes the download")
    if kind == "http":
        refusal = _refusal(int(outcome.get("status") or 0), outcome.get("code") or "", plan.repo_id, plan.revision,
                           plan.endpoint, hub_token())
        return HubError(f"{refusal} ({message})")
    if kind == "connection":
        return HubError(f"the connection to {_host(plan.endpoint)} was lost while downloading {plan.repo_id}: {kept}")
    detail = message or (stderr.strip().splitlines() or ["the download process ended without a word"])[-1]
    return HubError(f"downloading {plan.repo_id} failed ({detail[:200]}); {kept}")


def _write_ref(plan: DownloadPlan) -> None:
    """Point the branch (``refs/main``) at the downloaded commit, so a later load finds it offline."""
    if plan.revision == plan.commit:
        return
    ref = plan.folder / "refs" / plan.revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(plan.commit)
