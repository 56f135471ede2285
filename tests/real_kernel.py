"""A real IPython kernel driven the way JupyterLab drives it: through jupyter_client's kernel manager.

``interrupt()`` is ``KernelManager.interrupt_kernel()``, what the interrupt button (■) does: SIGINT to
the kernel's whole process group. Cells run with ``execute()`` (wait for the end) or ``start()`` plus
``wait()`` (do something while it runs); ``wait_for_output(msg_id, predicate)`` returns once an output
of the running cell matches, so a test acts on what the cell showed instead of sleeping.
"""

from __future__ import annotations

import os
import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil
from jupyter_client import KernelManager

PROJECT = Path(__file__).resolve().parents[1]


@dataclass
class CellRun:
    """What one cell produced: text of every output (updates included), its error, its reply."""

    msg_id: str
    texts: list[str] = field(default_factory=list)
    final: list[str] = field(default_factory=list)  # outputs as a notebook stores them (no updates)
    error: tuple[str, str] | None = None
    status: str | None = None
    stderr: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.final)


def _text_of(content: dict) -> str:
    if "text" in content:
        return content["text"]
    data = content.get("data", {})
    return data.get("text/plain", "")


class RealKernel:
    """A python3 kernel of this interpreter, started with the kernel manager; IPC transport."""

    def __init__(self, tmp: Path) -> None:
        self.km = KernelManager(kernel_name="python3", transport="ipc")
        self.km.connection_file = str(tmp / "kernel.json")
        self.km.ip = str(tmp / "kernel-ipc")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(PROJECT), os.environ.get("PYTHONPATH")) if p))
        self.km.start_kernel(cwd=str(PROJECT), env=env, extra_arguments=["--HistoryManager.enabled=False"])
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)
        self._runs: dict[str, CellRun] = {}

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid

    def processes(self) -> list[psutil.Process]:
        """The kernel's descendants (engine processes, multiprocessing's resource tracker)."""
        return psutil.Process(self.pid).children(recursive=True)

    def engine_pids(self) -> set[int]:
        """Descendants other than multiprocessing's resource tracker (it serves the whole kernel)."""
        pids = set()
        for proc in self.processes():
            try:
                if "resource_tracker" not in " ".join(proc.cmdline()):
                    pids.add(proc.pid)
            except psutil.Error:
                pass
        return pids

    # ----- cells -------------------------------------------------------------------------------------
    def start(self, code: str) -> str:
        msg_id = self.kc.execute(code, store_history=False)
        self._runs[msg_id] = CellRun(msg_id)
        return msg_id

    def _pump(self, timeout: float) -> dict:
        msg = self.kc.get_iopub_msg(timeout=timeout)
        run = self._runs.get(msg["parent_header"].get("msg_id"))
        if run is None:
            return msg
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream" and content.get("name") == "stderr":
            run.stderr.append(content["text"])
        if kind in ("stream", "display_data", "execute_result", "update_display_data"):
            text = _text_of(content)
            run.texts.append(text)
            if kind != "update_display_data" and text:
                run.final.append(text)
        elif kind == "error":
            run.error = (content["ename"], content["evalue"])
        elif kind == "status" and content["execution_state"] == "idle":
            run.status = "idle"
        return msg

    def wait_for_output(self, msg_id: str, predicate: Callable[[str], bool], timeout: float = 600) -> str:
        """Block until an output (or display update) of the running cell satisfies ``predicate``."""
        run = self._runs[msg_id]
        seen = 0
        while True:
            for text in run.texts[seen:]:
                if predicate(text):
                    return text
            seen = len(run.texts)
            if run.status == "idle":
                raise AssertionError(f"the cell ended before the awaited output; it showed: {run.texts[-5:]}, "
                                     f"error {run.error}")
            try:
                self._pump(timeout)
            except queue.Empty:
                raise AssertionError(f"no output for {timeout} s; the cell showed {run.texts[-5:]}") from None

    def wait(self, msg_id: str, timeout: float = 900) -> CellRun:
        run = self._runs[msg_id]
        while run.status != "idle":
            try:
                self._pump(timeout)
            except queue.Empty:
                raise AssertionError(f"the cell did not finish; it showed {run.texts[-5:]}") from None
        reply = self.kc.get_shell_msg(timeout=timeout)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=timeout)
        content = reply["content"]
        run.status = content["status"]
        if run.status == "error" and run.error is None:  # IPython prints a UsageError instead of raising it
            run.error = (content.get("ename", ""), content.get("evalue", ""))
        return run

    def execute(self, code: str, timeout: float = 900) -> CellRun:
        return self.wait(self.start(code), timeout)

    def ok(self, code: str, timeout: float = 900) -> str:
        """Run a cell that must succeed; returns what it showed."""
        run = self.execute(code, timeout)
        assert run.error is None, f"{code!r} failed: {run.error}"
        return run.text

    def interrupt(self) -> None:
        """What JupyterLab's interrupt button does: SIGINT to the kernel's process group."""
        self.km.interrupt_kernel()

    # ----- end -----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=False)
