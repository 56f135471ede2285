"""The download process: ``python -m vllm_magic.hub.worker REQUEST`` (what :func:`.download.fetch` runs).

It downloads the planned files of one commit into the Hugging Face cache, in the cache's own layout
(``blobs/HASH``, ``snapshots/COMMIT/NAME`` linking to it, huggingface_hub's lock files), so that
huggingface_hub, vLLM and transformers find them there. Each file is written to
``blobs/HASH.incomplete`` first and resumed from there with an HTTP range request: an interrupted
or broken download goes on where it stopped (huggingface_hub 2.4 starts every file over).

It prints one JSON line: ``{"path": SNAPSHOT}`` or ``{"error": KIND, "message": ..., "status": HTTP,
"code": X-Error-Code}`` with KIND one of ``connection``, ``http``, ``disk``, ``other``. It is a process
of its own so that Ctrl-C in the notebook ends it at once, mid-file; it ends itself when the process
that started it dies.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

#: Parallel file downloads (huggingface_hub's default).
WORKERS = 8


class Refused(Exception):
    """The server answered a file request with an error status."""

    def __init__(self, status: int, code: str, name: str) -> None:
        super().__init__(f"HTTP {status} {code} for {name}")
        self.status, self.code = status, code


class Short(Exception):
    """The server ended a file before its size."""


def _end_with_parent() -> None:
    parent = os.getppid()
    try:  # Linux: the kernel kills this process when its parent dies
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:  # everywhere else (and if the parent died before prctl)
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class Download:
    """One repository commit's planned files into the cache."""

    def __init__(self, request: dict) -> None:
        import httpx

        self.repo_id, self.commit, self.endpoint = request["repo_id"], request["commit"], request["endpoint"]
        cache = Path(request["cache"])
        folder_name = "models--" + self.repo_id.replace("/", "--")
        self.blobs = cache / folder_name / "blobs"
        self.snapshot = cache / folder_name / "snapshots" / self.commit
        self.locks = cache / ".locks" / folder_name
        for directory in (self.blobs, self.snapshot, self.locks):
            directory.mkdir(parents=True, exist_ok=True)
        self.files = request["files"]
        token = os.environ.get("HF_TOKEN")
        # httpx drops Authorization when a redirect leaves the Hub's host (its CDN must not see the token);
        # identity encoding: byte offsets of a range request are the file's own.
        headers = {"Accept-Encoding": "identity", "User-Agent": "vllm-magic"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.client = httpx.Client(headers=headers, follow_redirects=True,
                                   timeout=httpx.Timeout(60.0, connect=10.0))

    def run(self) -> dict:
        with ThreadPoolExecutor(max_workers=min(WORKERS, max(1, len(self.files)))) as pool:
            errors = [e for e in pool.map(self._one, self.files) if e is not None]
        return errors[0] if errors else {"path": str(self.snapshot)}

    def _one(self, file: dict) -> dict | None:
        try:
            self._fetch(file)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which words it for the user
            return _error(exc)
        return None

    def _fetch(self, file: dict) -> None:
        name, size, blob_name = file["name"], file["size"], file["blob"] or f"name-{quote(file['name'], safe='')}"
        blob = self.blobs / blob_name
        if not blob.is_file():
            with open(self.locks / f"{blob_name}.lock", "w") as lock:  # huggingface_hub's lock, same file
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not blob.is_file():
                    self._get(name, blob, size)
        link = self.snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_file():
            temporary = link.with_name(f".{link.name}.{os.getpid()}.link")
            temporary.unlink(missing_ok=True)
            temporary.symlink_to(os.path.relpath(blob, link.parent))
            os.replace(temporary, link)

    def _get(self, name: str, blob: Path, size: int) -> None:
        """Download one file into ``blob``, resuming its ``.incomplete`` part (one retry after a broken
        connection that had brought bytes)."""
        import httpx

        part = blob.with_name(blob.name + ".incomplete")
        url = f"{self.endpoint}/{self.repo_id}/resolve/{self.commit}/{quote(name)}"
        for attempt in (1, 2):
            before = _size(part)
            try:
                self._get_once(url, name, part, size)
                break
            except (httpx.TransportError, Short):
                if attempt == 2 or _size(part) <= before:
                    raise
        os.replace(part, blob)

    def _get_once(self, url: str, name: str, part: Path, size: int) -> None:
        offset = _size(part)
        if size and offset >= size:
            if offset == size:
                return
            offset = 0  # longer than the file: not a part of it
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self.client.stream("GET", url, headers=headers) as answer:
            if answer.status_code == 416 and offset:
                offset = 0  # the server cannot resume this one: from the start
                answer.close()
                return self._get_once(url, name, _truncated(part), size)
            if answer.status_code not in (200, 206):
                raise Refused(answer.status_code, answer.headers.get("X-Error-Code", ""), name)
            if answer.status_code == 200:
                offset = 0  # the server sent the whole file
            with open(part, "r+b" if offset else "wb") as out:
                out.seek(offset)
                out.truncate()
                for chunk in answer.iter_bytes():  # as it arrives: the bytes on disk are the progress
                    out.write(chunk)
        if size and _size(part) != size:
            raise Short(f"{name}: {_size(part)} of {size} bytes")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _truncated(path: Path) -> Path:
    path.unlink(missing_ok=True)
    return path


def _error(exc: Exception) -> dict:
    import httpx

    message = " ".join(str(exc).split())[:500] or type(exc).__name__
    if isinstance(exc, Refused):
        return {"error": "http", "message": message, "status": exc.status, "code": exc.code}
    if isinstance(exc, (httpx.TransportError, Short)):
        return {"error": "connection", "message": message}
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return {"error": "disk", "message": message}
    return {"error": "other", "message": f"{type(exc).__name__}: {message}"}


if __name__ == "__main__":
    _end_with_parent()
    print(json.dumps(Download(json.loads(sys.argv[1])).run()), flush=True)
