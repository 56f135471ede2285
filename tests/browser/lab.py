"""A throw-away JupyterLab for the browser test: loopback, token auth, the project's kernel.

Everything lives in a temporary directory (configuration, settings, runtime files, the kernel spec
and the notebook), so the user's own Jupyter set-up is neither read nor changed. ``stop()`` shuts
the kernels down through the REST API, then ends the server and anything it started, by pid.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat

KERNEL_NAME = "vllm-magic-test"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def ensure_chromium() -> str:
    """Debian's Chromium, installed with apt when missing (a browser is never downloaded otherwise)."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    apt = shutil.which("apt-get")
    if apt is None:
        raise RuntimeError(f"{CHROMIUM} is missing and apt-get is not available to install Debian's chromium")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log = []
    for command in ([apt, "install", "-y", "chromium"], [apt, "update"], [apt, "install", "-y", "chromium"]):
        if command[1] == "update" and os.path.exists(CHROMIUM):
            break
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        log.append(f"$ {' '.join(command)} -> {proc.returncode}\n{proc.stderr[-800:]}")
    if not os.path.exists(CHROMIUM):
        raise RuntimeError("could not install Debian's chromium:\n" + "\n".join(log))
    return CHROMIUM


# Starts JupyterLab so that it ends with the test process even when that one is killed: Linux sends
# it SIGTERM when its parent dies (PR_SET_PDEATHSIG survives exec), the server then shuts its
# kernels down, and a kernel whose server is gone exits on its own (ipykernel's parent poller).
_LAUNCHER = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except Exception:
    pass
if os.getppid() != int(os.environ["VLLM_MAGIC_TEST_PARENT"]):
    sys.exit("the test process is gone")
os.execv(sys.executable, [sys.executable, "-m", "jupyterlab", *sys.argv[1:]])
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_notebook(path: Path, cells: list[str]) -> Path:
    """A notebook of code cells that runs on the project's kernel."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "vllm-magic (test)", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(nb, path)
    return path


class JupyterLab:
    """A JupyterLab server started in ``root`` with the project's kernel; ``url(path)`` opens a file."""

    def __init__(self, root: Path, project: Path, python: str = sys.executable) -> None:
        self.root = root
        self.project = project
        self.python = python
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.log_path = root / "jupyterlab.log"

    # ----- set-up ----------------------------------------------------------------------------------
    def _prepare(self) -> dict[str, str]:
        home = self.root / ".jupyter-home"
        kernel_dir = home / "data" / "kernels" / KERNEL_NAME
        kernel_dir.mkdir(parents=True, exist_ok=True)
        # The venv's python, with the code under test first on the path (the package may be
        # installed in editable mode from another checkout).
        pythonpath = os.pathsep.join(p for p in (str(self.project), os.environ.get("PYTHONPATH", "")) if p)
        (kernel_dir / "kernel.json").write_text(json.dumps({
            "argv": [self.python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "vllm-magic (test)", "language": "python",
            "env": {"PYTHONPATH": pythonpath},
        }))
        settings = home / "lab-settings"
        # No news or update pop-ups over the notebook.
        notification = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        notification.parent.mkdir(parents=True, exist_ok=True)
        notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        return dict(
            os.environ,
            JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
            JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTER_PATH=str(home / "data"),
            JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
            PYTHONPATH=pythonpath, JUPYTER_PLATFORM_DIRS="1",
        )

    def start(self, timeout: float = 180.0) -> None:
        env = self._prepare()
        env["VLLM_MAGIC_TEST_PARENT"] = str(os.getpid())
        command = [
            self.python, "-c", _LAUNCHER, "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}", "--ServerApp.open_browser=False",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            f"--MappingKernelManager.default_kernel_name={KERNEL_NAME}", "--LabApp.extension_manager=readonly",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers run as root
            command.append("--allow-root")
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api("GET", "/api/status")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"JupyterLab did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    # ----- use -------------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/lab/tree/{path}?token={self.token}&reset"

    def api(self, method: str, path: str) -> object:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # ----- tear-down -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Shut the kernels down, end the server, then kill anything of theirs still alive (by pid)."""
        if self.proc is None:
            return
        import psutil

        try:
            started = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            started = []
        try:
            for kernel in self.api("GET", "/api/kernels") or []:
                try:
                    self.api("DELETE", f"/api/kernels/{kernel['id']}")
                except Exception:
                    pass
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # Kernels run in sessions of their own; their engine processes are their children.
        leftovers = []
        for proc in started:
            try:
                leftovers.extend([proc, *proc.children(recursive=True)])
            except psutil.Error:
                pass
        for proc in leftovers:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(leftovers, timeout=15)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        self.proc = None
