"""A stand-in for the Hugging Face Hub: a real HTTP server on 127.0.0.1 serving model repos from local folders.

vllm-magic's downloader (``vllm_magic.hub``) and huggingface_hub (checked with 2.4.0) download from it exactly as
from huggingface.co when pointed at its ``url`` (``HF_ENDPOINT``; huggingface_hub reads that once, at import, so
pass it ``endpoint=standin.url``). Only the plain-HTTP download path exists here: no ``X-Xet-*`` header is ever
sent, so no client tries Xet storage.

Routes, as huggingface_hub 2.4.0 calls them (the client code read: hf_api.py, file_download.py,
_snapshot_download.py, utils/_http.py):

- ``GET /api/models/{repo_id}`` and ``GET /api/models/{repo_id}/revision/{revision}``: model info
  (``HfApi.model_info``/``repo_info``; ``?blobs=true`` from ``files_metadata=True`` adds sizes, blob ids and LFS
  details to ``siblings``). snapshot_download calls it to turn a branch into a commit sha.
- ``GET /api/models/{repo_id}/tree/{revision}[/{path}]`` (``recursive``, ``expand``): the file listing
  (``list_repo_tree``); snapshot_download lists the files to fetch with it, one page, no ``Link`` header.
- ``POST /api/models/{repo_id}/paths-info/{revision}``: ``HfApi.get_paths_info``.
- ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}``: the file itself, with the headers hf_hub_download reads
  (``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, ``Content-Length``) and
  ``Range`` support (206 + ``Content-Range``). The Hub answers HEAD on an LFS file with a redirect to its CDN; here
  the file is served directly (the client takes the metadata from the 200 just as well).

Errors carry the ``X-Error-Code`` the client maps to its exceptions (utils/_http.py ``hf_raise_for_status``):
``RepoNotFound`` -> RepositoryNotFoundError, ``RevisionNotFound`` -> RevisionNotFoundError, ``EntryNotFound`` ->
RemoteEntryNotFoundError (an EntryNotFoundError), ``GatedRepo`` -> GatedRepoError (the code decides, whatever the
status; 401 without a token and 403 with a wrong one, as the Hub does).

A gated repo behaves like one on the Hub: its model info and file listing are public (``gated: "manual"``), its
files need ``Authorization: Bearer <token>``. So ``snapshot_download`` of it without the token gets through
``repo_info`` and the listing (writing ``refs/main`` and ``trees/<sha>.json`` into the cache) and raises
GatedRepoError on the first file.

What huggingface_hub 2.4.0 does with it, for tests to expect (measured against this stand-in):

- A download writes ``blobs/<etag>.<8 random hex>.incomplete`` and deletes it when it fails or is cancelled
  (an exception raised from ``tqdm_class.update`` included): a later call never resumes an earlier one, it starts
  from byte 0. Only a process killed mid-download leaves its ``.incomplete`` behind (and nothing cleans it up).
  ``Range: bytes=N-`` is sent only by the retries inside one download, after a broken connection or a timeout.
- It reads the body in 10 MiB pieces: progress (``tqdm_class.update``, called from the download worker threads
  of snapshot_download) and the temporary file advance 10 MiB at a time.
- Nothing listening at the endpoint: snapshot_download of a branch raises LocalEntryNotFoundError at once (its
  ``repo_info`` call is not retried); hf_hub_download, ``list_repo_tree`` and snapshot_download of a commit sha
  (which starts with the tree listing) retry with backoff (1+2+4+8+8 s) and fail after ~23 s.

The server is quiet (no log line, no traceback on stderr), and every wait in it is bounded or woken by
``stop()``; nothing sleeps for a guessed time (tests/test_suite_rules.py).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable
from urllib.parse import parse_qs, quote, unquote

# Files the Hub keeps in LFS: the default .gitattributes patterns of a new model repo, and anything over 10 MB
# (the Hub refuses larger non-LFS files). An LFS file's ETag is its sha256, a regular file's its git blob sha1:
# that is also the blob name in the huggingface_hub cache (blobs/<etag>).
LFS_SUFFIXES = frozenset({
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".ot", ".tflite", ".gguf",
    ".npy", ".npz", ".pkl", ".pickle", ".joblib", ".model", ".arrow", ".parquet", ".zip", ".gz", ".tar", ".zst",
})
LFS_MIN_SIZE = 10 * 1024 * 1024

# Content is written in pieces this big (smaller under a `rate`), so that holds, drops and the throttle act
# within a few tens of kilobytes.
_CHUNK = 64 * 1024

# A fixed date for lastModified/createdAt: the info of a repo never changes between two runs.
_DATE = "2024-11-01T12:00:00.000Z"

# Path segments that follow a repo id in API urls (same list as huggingface_hub's _REPO_URL_SUBPATHS): tells a
# one-segment repo id ("gpt2") from an "org/name" one when the repo is unknown.
_SUBPATHS = {"resolve", "tree", "blob", "raw", "refs", "commit", "discussions", "settings", "revision", "paths-info"}

# Hashing the 538 MB demo weights takes ~0.5 s: files are hashed once per process, keyed by what would change
# their content.
_HASHES: dict[tuple[str, int, int, bool], str] = {}
_HASHES_LOCK = threading.Lock()


def _file_hash(path: Path, size: int, lfs: bool) -> str:
    """sha256 of the content for an LFS file, the git blob sha1 (``sha1("blob <size>\\0" + content)``) otherwise."""
    stat = path.stat()
    key = (str(path.resolve()), size, stat.st_mtime_ns, lfs)
    with _HASHES_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    digest = hashlib.sha256() if lfs else hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(8 * 1024 * 1024):
            digest.update(block)
    value = digest.hexdigest()
    with _HASHES_LOCK:
        _HASHES[key] = value
    return value


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass(frozen=True)
class RepoFile:
    """One file of a served repo."""

    path: str  # in the repo, "/"-separated
    local: Path
    size: int
    blob_id: str  # git blob sha1 (of the LFS pointer for an LFS file)
    sha256: str | None  # LFS files only
    pointer_size: int | None  # LFS files only

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id


@dataclass(frozen=True)
class Repo:
    """A served repo at revision "main"."""

    repo_id: str
    commit: str
    files: dict[str, RepoFile]  # by path
    gated: bool

    def folders(self) -> list[str]:
        """Every folder that holds a file, "a", "a/b", ... (the tree endpoint lists them too)."""
        found = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                found.add("/".join(parts[:i]))
        return sorted(found)


def _scan(repo_id: str, root: Path, gated: bool, commit: str | None) -> Repo:
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{repo_id}: {root} is not a directory")
    listing = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    if commit is None:
        # Stable across runs and processes, and different as soon as a file is added, removed or resized.
        seed = repo_id + "\n" + "".join(f"{rel}\0{p.stat().st_size}\n" for rel, p in listing)
        commit = hashlib.sha1(seed.encode()).hexdigest()
    elif len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
        raise ValueError(f"commit must be 40 lowercase hex digits, got {commit!r}")
    files = {}
    for rel, p in listing:
        size = p.stat().st_size
        lfs = p.suffix.lower() in LFS_SUFFIXES or size >= LFS_MIN_SIZE
        if lfs:
            sha256 = _file_hash(p, size, lfs=True)
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
            files[rel] = RepoFile(rel, p, size, _git_blob_sha1(pointer), sha256, len(pointer))
        else:
            files[rel] = RepoFile(rel, p, size, _file_hash(p, size, lfs=False), None, None)
    return Repo(repo_id, commit, files, gated)


@dataclass
class Request:
    """One request the stand-in received."""

    method: str
    path: str  # percent-decoded, without the query string
    query: str  # raw query string ("" when none)
    headers: dict[str, str] = field(default_factory=dict)  # header names lower-cased
    range: str | None = None  # the Range header, e.g. "bytes=1048576-"


class _Abort(Exception):
    """The download's connection is gone (stop, drop): end the handler without answering."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler blocked on a dead client never keeps the test process alive

    def __init__(self, address, handler, standin: "HubStandIn"):
        self.standin = standin
        # Set when this server closes (stop, drop): woken handlers end instead of sending on.
        self.closing = threading.Event()
        self.closed = threading.Event()  # set once the listener and every connection are closed
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def handle_error(self, request, client_address):
        # A client that went away mid-answer is routine here (cancelled downloads, stop, drop): no traceback.
        pass


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive, like the Hub: httpx reuses its connections, so stop() has idle ones to close too.
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self):
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)
        if self.server.closing.is_set():  # accepted in the instant the server closed
            _shutdown(self.connection)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format, *args):
        pass  # quiet: no access log on stderr

    def do_GET(self):
        self._answer()

    def do_HEAD(self):
        self._answer()

    def do_POST(self):
        self._answer()

    def _answer(self):
        try:
            self.server.standin._handle(self)
        except (_Abort, OSError):
            self.close_connection = True


def _shutdown(sock: socket.socket) -> None:
    """End a connection now: the peer sees it close (a download in flight reads a short body). The handler's own
    thread closes the socket object afterwards (closing it here could hand its fd number to another socket)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class HubStandIn:
    """A Hugging Face Hub stand-in serving ``repos`` on ``http://127.0.0.1:<port>``.

    ``repos`` maps a repo id ("org/name") to a local directory whose files (recursively) are the repo's files at
    revision "main". ``gated`` repo ids answer their files with 401 (``X-Error-Code: GatedRepo``) unless the request
    carries ``Authorization: Bearer <token>`` (403 with another token). ``commit`` is the 40-hex sha of "main" in
    every repo (default: a stable sha1 of the repo id and its file names and sizes). ``port`` 0 picks a free port;
    give one (e.g. an earlier stand-in's) to serve on a known url.

    Use it as a context manager (``with HubStandIn({...}) as hub:``), or ``start()``/``stop()``. ``start()`` after
    ``stop()`` serves again on the same port (the request log and byte counters go on; holds and drops are reset):
    a download that lost its connection retries the same url for about 5 s (huggingface_hub's ``http_get``: 5
    retries, 1 s apart) and resumes with ``Range: bytes=N-``, N being what it had written (a multiple of 10 MiB).

    Attributes: ``url`` ("http://127.0.0.1:PORT", set by ``start()``), ``token``, ``requests`` (every
    ``Request``, in arrival order, logged before it is answered), ``held`` (see ``hold_after``) and ``rate``
    (``None``, or bytes/second for all file content together, changeable while serving).
    """

    def __init__(self, repos: dict[str, Path], *, gated: Iterable[str] = (), token: str = "hf_standin_token",
                 commit: str | None = None, port: int = 0):
        gated = set(gated)
        unknown = gated - set(repos)
        if unknown:
            raise ValueError(f"gated repos that are not served: {sorted(unknown)}")
        self._repos = {rid: _scan(rid, Path(path), rid in gated, commit) for rid, path in repos.items()}
        self.token = token
        self.url = ""
        self._port = port
        self.requests: list[Request] = []
        self.rate: float | None = None
        self.held = threading.Event()
        # One lock for the byte counts, the hold and the throttle clock; held downloads wait on it.
        self._cond = threading.Condition()
        self._sent_total = 0
        self._in_flight = 0  # bytes reserved by downloads but not yet handed to their socket
        self._sent_by_repo: dict[str, int] = {}
        self._hold_at: int | None = None
        self._drop_at: int | None = None
        self._rate_clock = 0.0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._close_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> "HubStandIn":
        """Listen and serve in a daemon thread; ``url`` is set once this returns."""
        if self._server is not None:
            if not self._server.closing.is_set():
                raise RuntimeError("the stand-in is already serving")
            self.stop()  # dropped (drop_after): finish closing that server (and reset the drop) first
        server = _Server(("127.0.0.1", self._port), _Handler, self)
        self._port = server.server_address[1]
        self.url = f"http://127.0.0.1:{self._port}"
        self._server = server
        # A short poll: closing the listener (stop, drop) waits for serve_forever's loop to notice.
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"hub-standin-{self._port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close every open connection: a download in flight sees its connection drop, a held
        one is woken and dropped the same way. Clears the hold and the drop (a later ``start()`` serves plainly).
        Safe to call twice, or before ``start()``."""
        self._close(self._server)
        self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._cond:
            self._hold_at = None
            self._drop_at = None
            self.held.clear()

    def __enter__(self) -> "HubStandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port served on (0 before the first start with ``port=0``)."""
        return self._port

    def commit(self, repo_id: str) -> str:
        """The commit sha of "main" in a served repo."""
        return self._repos[repo_id].commit

    def files(self, repo_id: str) -> dict[str, RepoFile]:
        """A served repo's files by path, with their sizes, blob ids and LFS sha256."""
        return dict(self._repos[repo_id].files)

    # -- test controls ---------------------------------------------------------------------------------------------

    def bytes_sent(self, repo_id: str | None = None) -> int:
        """File-content bytes sent so far (all repos, or one), counted once handed to the socket."""
        with self._cond:
            return self._sent_total if repo_id is None else self._sent_by_repo.get(repo_id, 0)

    def hold_after(self, nbytes: int) -> None:
        """Pause every file download once ``nbytes`` content bytes in total were sent (headers sent, connection
        open) until ``release()`` or ``stop()``; downloads that start meanwhile pause at once. ``held`` is set when
        a download pauses there, with exactly ``nbytes`` handed to the sockets (``bytes_sent() == nbytes``).

        The client does not wait forever: with no byte for ``HF_HUB_DOWNLOAD_TIMEOUT`` (10 s) it times out and
        asks again with a ``Range`` (held again), and gives up with ``httpx2.ReadTimeout`` after 6 tries (~65 s).
        It writes what it receives in 10 MiB pieces, so a hold inside a file's first 10 MiB leaves its temporary
        blob empty."""
        with self._cond:
            self._hold_at = nbytes
            self._cond.notify_all()

    def release(self) -> None:
        """Let held downloads go on and clear the hold (and ``held``)."""
        with self._cond:
            self._hold_at = None
            self.held.clear()
            self._cond.notify_all()

    def drop_after(self, nbytes: int) -> None:
        """Once ``nbytes`` content bytes in total were sent, stop listening (new connections are refused) and
        close every connection, downloads in flight included: the server is gone mid-download (exactly ``nbytes``
        were sent)."""
        with self._cond:
            self._drop_at = nbytes
            reached = self._sent_total >= nbytes
        if reached:
            self._close(self._server)

    # -- internals ---------------------------------------------------------------------------------------------

    def _close(self, server: _Server | None) -> _Server | None:
        """Close one server generation: listener first (so a client that reconnects is refused), then every
        connection. Called by stop() and by a handler thread crossing the drop threshold."""
        if server is None:
            return None
        with self._close_lock:
            first = not server.closing.is_set()
            server.closing.set()
        if not first:
            server.closed.wait(timeout=5)  # another thread is closing it: return once it is closed
            return server
        with self._cond:
            self._cond.notify_all()  # wake held downloads: they see `closing` and end
        server.shutdown()  # waits for serve_forever to leave its loop (<= poll_interval)
        server.server_close()  # the listening socket: connecting is refused from here on
        with server.connections_lock:
            connections = list(server.connections)
        for conn in connections:
            _shutdown(conn)
        server.closed.set()
        return server

    def _handle(self, h: _Handler) -> None:
        raw_path, _, query = h.path.partition("?")
        headers = {k.lower(): v for k, v in h.headers.items()}
        self.requests.append(Request(h.command, unquote(raw_path), query, headers, headers.get("range")))
        body = b""
        if h.command == "POST":
            length = int(h.headers.get("Content-Length") or 0)
            body = h.rfile.read(length) if length else b""

        if raw_path.startswith("/api/models/"):
            self._api(h, raw_path[len("/api/models/"):], query, body)
        elif "/resolve/" in raw_path:
            repo_part, _, rest = raw_path[1:].partition("/resolve/")
            revision, _, file_part = rest.partition("/")
            self._resolve(h, unquote(repo_part), unquote(revision), unquote(file_part))
        else:
            self._error(h, 404, None, "Sorry, we can't find the page you are looking for.")

    def _split_repo(self, rest: str) -> tuple[str, list[str]]:
        """``org/name/tree/main/x`` -> (``org/name``, [``tree``, ``main``, ``x``]), segments percent-decoded (the
        client quotes revisions and tree paths with safe="", so a "/" in them arrives as %2F)."""
        segments = [unquote(s) for s in rest.split("/")]
        if len(segments) >= 2 and "/".join(segments[:2]) in self._repos:
            return "/".join(segments[:2]), segments[2:]
        if segments[0] in self._repos:
            return segments[0], segments[1:]
        if len(segments) >= 2 and segments[1] not in _SUBPATHS:
            return "/".join(segments[:2]), segments[2:]
        return segments[0], segments[1:]

    def _repo(self, h: _Handler, repo_id: str, revision: str, files: bool) -> Repo | None:
        """The repo if the request may see it at this revision; otherwise answers the Hub's error and returns None.
        ``files``: the request reads file content (only that is gated, as on the Hub)."""
        repo = self._repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound", "Repository not found")
            return None
        if files and repo.gated:
            auth = h.headers.get("Authorization")
            if auth is None:
                self._error(h, 401, "GatedRepo",
                            f"Access to model {repo_id} is restricted. You must have access to it and be "
                            "authenticated to access it. Please log in.")
                return None
            if auth != f"Bearer {self.token}":
                self._error(h, 403, "GatedRepo",
                            f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                            f"Visit {self.url}/{repo_id} to ask for access.")
                return None
        if revision not in ("main", repo.commit):
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    # -- /api/models -------------------------------------------------------------------------------------------

    def _api(self, h: _Handler, rest: str, query: str, body: bytes) -> None:
        repo_id, sub = self._split_repo(rest)
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        if h.command == "GET" and not sub:
            self._info(h, repo_id, "main", params)
        elif h.command == "GET" and len(sub) == 2 and sub[0] == "revision":
            self._info(h, repo_id, sub[1], params)
        elif h.command == "GET" and len(sub) >= 2 and sub[0] == "tree":
            self._tree(h, repo_id, sub[1], "/".join(sub[2:]), params)
        elif h.command == "POST" and len(sub) == 2 and sub[0] == "paths-info":
            self._paths_info(h, repo_id, sub[1], body, h.headers.get("Content-Type") or "")
        else:
            self._error(h, 404, None, "Sorry, we can't find the page you are looking for.")

    def _info(self, h: _Handler, repo_id: str, revision: str, params: dict[str, str]) -> None:
        repo = self._repo(h, repo_id, revision, files=False)
        if repo is None:
            return
        blobs = params.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for f in repo.files.values():
            sibling: dict = {"rfilename": f.path}
            if blobs:  # files_metadata=True: what gives sizes
                sibling.update(size=f.size, blobId=f.blob_id)
                if f.sha256 is not None:
                    sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": f.pointer_size}
            siblings.append(sibling)
        author = repo_id.split("/")[0] if "/" in repo_id else None
        info = {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": author,
            "sha": repo.commit,
            "lastModified": _DATE,
            "createdAt": _DATE,
            "private": False,
            "disabled": False,
            "gated": "manual" if repo.gated else False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(f.size for f in repo.files.values()),
        }
        self._json(h, info)

    def _entry(self, f: RepoFile) -> dict:
        entry: dict = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
        if f.sha256 is not None:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
        return entry

    @staticmethod
    def _folder(path: str) -> dict:
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}

    def _tree(self, h: _Handler, repo_id: str, revision: str, path: str, params: dict[str, str]) -> None:
        repo = self._repo(h, repo_id, revision, files=False)
        if repo is None:
            return
        recursive = params.get("recursive", "").lower() in ("1", "true")
        path = path.strip("/")
        folders = repo.folders()
        if path and path not in folders:
            self._error(h, 404, "EntryNotFound", f"{path} does not exist on \"{revision}\"", commit=repo.commit)
            return
        prefix = f"{path}/" if path else ""

        def wanted(p: str) -> bool:
            if not p.startswith(prefix):
                return False
            return recursive or "/" not in p[len(prefix):]

        entries = [self._folder(p) for p in folders if wanted(p)]
        entries += [self._entry(f) for f in repo.files.values() if wanted(f.path)]
        self._json(h, entries)

    def _paths_info(self, h: _Handler, repo_id: str, revision: str, body: bytes, content_type: str) -> None:
        repo = self._repo(h, repo_id, revision, files=False)
        if repo is None:
            return
        if "json" in content_type:
            paths = json.loads(body or b"{}").get("paths", [])
        else:  # the client posts a form: paths=a&paths=b&expand=False
            paths = parse_qs(body.decode()).get("paths", [])
        folders = set(repo.folders())
        entries = []
        for p in paths:
            p = p.strip("/")
            if p in repo.files:
                entries.append(self._entry(repo.files[p]))
            elif p in folders:
                entries.append(self._folder(p))
        self._json(h, entries)

    # -- /{repo_id}/resolve ------------------------------------------------------------------------------------

    def _resolve(self, h: _Handler, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(h, repo_id, revision, files=True)
        if repo is None:
            return
        f = repo.files.get(path)
        if f is None:
            # With the commit: the client records the file's absence in its cache (.no_exist/<sha>/<path>).
            self._error(h, 404, "EntryNotFound", "Entry not found", commit=repo.commit)
            return
        start, end = 0, f.size  # end exclusive
        status = 200
        wanted = h.headers.get("Range")
        if wanted is not None:
            parsed = _parse_range(wanted, f.size)
            if parsed is None:
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{f.size}")
                h.send_header("Content-Length", "0")
                h.send_header("X-Repo-Commit", repo.commit)
                h.end_headers()
                return
            start, end = parsed
            status = 206
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(end - start))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", f'"{f.etag}"')
        h.send_header("X-Repo-Commit", repo.commit)
        if f.sha256 is not None:
            # What the Hub's redirect for an LFS file carries: the client takes the blob name and size from these.
            h.send_header("X-Linked-Etag", f'"{f.sha256}"')
            h.send_header("X-Linked-Size", str(f.size))
        name = f.path.rsplit("/", 1)[-1]
        h.send_header("Content-Disposition", f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{f.size}")
        h.end_headers()  # flushed: the client has the headers before the first content byte
        if h.command == "HEAD":
            return
        self._send_content(h, repo.repo_id, f, start, end)

    def _send_content(self, h: _Handler, repo_id: str, f: RepoFile, start: int, end: int) -> None:
        server = h.server
        with open(f.local, "rb") as src:
            src.seek(start)
            remaining = end - start
            while remaining > 0:
                n = self._reserve(server, remaining)
                sent = 0
                try:
                    self._throttle(server, n)
                    data = src.read(n)
                    if not data:
                        raise _Abort()  # the file shrank under us: end the body short, as a broken server would
                    h.wfile.write(data)  # unbuffered: sendall
                    sent = len(data)
                finally:
                    drop = self._account(repo_id, n, sent)
                remaining -= sent
                if drop:
                    self._close(server)
                    raise _Abort()

    def _reserve(self, server: _Server, remaining: int) -> int:
        """How many bytes to send next, reserved against the hold and drop thresholds so that concurrent downloads
        together land exactly on them. Waits while a threshold is reached (woken by release, stop, drop)."""
        with self._cond:
            while True:
                if server.closing.is_set():
                    raise _Abort()
                committed = self._sent_total + self._in_flight
                hold = self._hold_at is not None and committed >= self._hold_at
                drop = self._drop_at is not None and committed >= self._drop_at
                if not (hold or drop):
                    break
                if hold and self._sent_total >= self._hold_at:
                    # Every byte before the hold is handed to the socket: now the download is held.
                    self.held.set()
                self._cond.wait(timeout=1.0)  # woken by _account, release() and _close(); the timeout only bounds it
            n = min(remaining, _CHUNK)
            for threshold in (self._hold_at, self._drop_at):
                if threshold is not None:
                    n = min(n, threshold - committed)
            rate = self.rate
            if rate:
                n = min(n, max(1, int(rate / 20)))  # ~20 pieces a second: progress moves smoothly
            self._in_flight += n
            return n

    def _account(self, repo_id: str, reserved: int, sent: int) -> bool:
        """Count a piece as sent; True if that crossed the drop threshold."""
        with self._cond:
            self._in_flight -= reserved
            self._sent_total += sent
            self._sent_by_repo[repo_id] = self._sent_by_repo.get(repo_id, 0) + sent
            self._cond.notify_all()  # downloads waiting for the in-flight bytes of a hold
            return sent > 0 and self._drop_at is not None and self._sent_total >= self._drop_at

    def _throttle(self, server: _Server, n: int) -> None:
        """Keep all downloads together at ``rate`` bytes/s: each piece takes the next slot of a shared clock."""
        rate = self.rate
        if not rate:
            return
        with self._cond:
            now = time.monotonic()
            slot_start = max(now, self._rate_clock)
            self._rate_clock = slot_start + n / rate
            delay = self._rate_clock - now
        if delay > 0 and server.closing.wait(delay):
            raise _Abort()

    # -- answers -----------------------------------------------------------------------------------------------

    def _json(self, h: _Handler, value) -> None:
        payload = json.dumps(value).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json; charset=utf-8")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)

    def _error(self, h: _Handler, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        payload = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json; charset=utf-8")
        h.send_header("Content-Length", str(len(payload)))
        if code is not None:
            h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        if commit is not None:
            h.send_header("X-Repo-Commit", commit)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``bytes=N-``, ``bytes=N-M`` or ``bytes=-K`` -> (start, end exclusive); None if unsatisfiable."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            start, end = max(0, size - int(last)), size
        else:
            start = int(first)
            end = min(size, int(last) + 1) if last else size
    except ValueError:
        return None
    if start >= size or start >= end:
        return None
    return start, end
