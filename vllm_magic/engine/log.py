"""Keep vLLM's log flood out of the notebook, and keep it readable on demand.

vLLM logs from the kernel process and from the engine processes it spawns; those children write
straight to file descriptors 1 and 2, which ipykernel forwards into the cell. While an engine starts,
``EngineLog.capture()`` points both descriptors (and ``sys.stdout``/``sys.stderr``) at a log file, so
the children inherit the file for their whole life. The kernel's own ``vllm`` logger is routed to the
same file. ``verbose=True`` leaves everything where it was, so vLLM's logs show as usual.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from ..paths import logs_dir

__all__ = ["EngineLog", "quiet_vllm_environment"]

# Lines worth showing as the loading stage, matched in order of appearance.
_STAGE_HINTS = (
    ("Loading safetensors", "loading weights"),
    ("Loading weights", "loading weights"),
    ("Model loading took", "weights loaded"),
    ("KV cache", "allocating KV cache"),
    ("GPU KV cache size", "allocating KV cache"),
    ("Capturing CUDA graph", "capturing CUDA graphs"),
    ("torch.compile", "compiling"),
    ("init engine", "warming up"),
)


def quiet_vllm_environment(verbose: bool = False) -> None:
    """Set vLLM's logging variables, and its grammar compile timeout, before vLLM is imported (children
    inherit them; values the user set win)."""
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    if verbose:
        os.environ["VLLM_LOGGING_LEVEL"] = os.environ.get("VLLM_MAGIC_LOG_LEVEL", "INFO")
    else:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", os.environ.get("VLLM_MAGIC_LOG_LEVEL", "INFO"))
    # Progress bars of weight loading would otherwise be the loudest thing in the cell.
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # vLLM gives a --regex/--json grammar 5 s to compile (a guard for servers against hostile patterns),
    # then drops the request with nothing to show: a notebook's own pattern compiled in 2.5 s on an
    # idle 2-core machine and timed out when another engine was busy.
    os.environ.setdefault("VLLM_REGEX_COMPILATION_TIMEOUT_S", "60")


#: Packages whose warnings belong in the engine log (path segments of the file that warns).
_LIBRARIES = tuple(f"{os.sep}{name}{os.sep}" for name in (
    "vllm", "torch", "triton", "xgrammar", "llguidance", "outlines", "outlines_core", "transformers",
    "flashinfer", "tokenizers", "lm_format_enforcer", "compressed_tensors"))
_shown_before: Any = None
_routing_log: list["EngineLog | None"] = [None]


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    log = _routing_log[0]
    if log is None or log.verbose or not any(part in filename for part in _LIBRARIES):
        _shown_before(message, category, filename, lineno, file, line)
        return
    with contextlib.suppress(OSError), open(log.path, "a") as f:
        f.write(warnings.formatwarning(message, category, filename, lineno, line))


class _TeeToCurrentStderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at the time (the cell in a kernel)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class EngineLog:
    """One log file for everything the engine says, with a capture window around its start."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        if path is None:
            path = logs_dir() / f"engine-{os.getpid()}.log"
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self.verbose = False
        self._file_handler: logging.Handler | None = None
        self._stream_handler: logging.Handler | None = None

    def mark(self, message: str) -> None:
        """Write a separator line of our own (load, unload) into the log."""
        with open(self.path, "a") as f:
            f.write(f"\n===== vllm-magic {time.strftime('%H:%M:%S')} {message} =====\n")

    def route_python_logger(self, verbose: bool) -> None:
        """Send the kernel's ``vllm`` and ``transformers`` loggers to the file (and to the cell when
        verbose): vLLM's detokenizer calls transformers' tokenizers in the kernel, whose warnings
        (a newer transformers warns on the first decode of a BPE tokenizer) reached the cell on GPUs."""
        self.verbose = verbose
        if self._file_handler is None:
            self._file_handler = logging.FileHandler(self.path)
            self._file_handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s",
                                                              "%m-%d %H:%M:%S"))
        for name in ("vllm", "transformers"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.addHandler(self._file_handler)
            if verbose:
                self._stream_handler = self._stream_handler or _TeeToCurrentStderr()
                logger.addHandler(self._stream_handler)
            logger.propagate = False

    def route_library_warnings(self) -> None:
        """Send Python warnings raised inside vLLM and the libraries it drives (torch, Triton, the
        structured-output backends, transformers) to the file for good, or to the cell when verbose;
        a request's first use of a kernel or a grammar warned into the cell on GPUs. Other warnings,
        the user's own among them, are shown as before."""
        global _shown_before
        if _shown_before is not None:
            _routing_log[0] = self
            return
        _shown_before = warnings.showwarning
        _routing_log[0] = self
        warnings.showwarning = _show_warning

    @contextlib.contextmanager
    def capture(self, verbose: bool = False) -> Iterator[None]:
        """Redirect fds 1/2 and ``sys.stdout``/``sys.stderr`` into the log file (unless verbose)."""
        if verbose:
            yield
            return
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        log_file = open(self.path, "a", buffering=1)
        saved = {}
        try:
            for fd in (1, 2):
                try:
                    saved[fd] = os.dup(fd)
                    os.dup2(log_file.fileno(), fd)
                except OSError:  # no such descriptor (embedded interpreters): nothing to redirect
                    saved.pop(fd, None)
            with contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
                yield
        finally:
            with contextlib.suppress(Exception):
                log_file.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            log_file.close()

    def read(self, lines: int | None = None) -> str:
        """The log's text, or its last ``lines`` lines."""
        try:
            text = self.path.read_text(errors="replace")
        except OSError:
            return ""
        if lines is None:
            return text
        return "\n".join(text.splitlines()[-lines:])

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def text_since(self, offset: int) -> str:
        """What the log received after ``offset`` bytes."""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def errors_since(self, offset: int, limit: int = 6) -> list[str]:
        """Lines that look like the root cause of a failure, written after ``offset`` bytes."""
        keep = [line.strip() for line in self.text_since(offset).splitlines()
                if any(key in line for key in ("Error", "ERROR", "error:", "Exception"))
                and "Traceback" not in line]
        return keep[-limit:]

    @contextlib.contextmanager
    def follow(self, callback: Callable[[str, float], None] | None, interval: float = 0.5) -> Iterator[None]:
        """Call ``callback(stage, elapsed_seconds)`` every ``interval`` while the block runs."""
        if callback is None:
            yield
            return
        start = time.monotonic()
        offset = self.size()
        stop = threading.Event()

        def run() -> None:
            stage = "starting engine"
            seen = offset
            while not stop.wait(interval):
                try:
                    with open(self.path, "rb") as f:
                        f.seek(seen)
                        chunk = f.read().decode(errors="replace")
                        seen = f.tell()
                except OSError:
                    chunk = ""
                for line in chunk.splitlines():
                    for needle, name in _STAGE_HINTS:
                        if needle in line:
                            stage = name
                with contextlib.suppress(Exception):
                    callback(stage, time.monotonic() - start)

        thread = threading.Thread(target=run, name="vllm-magic-load-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=2)
