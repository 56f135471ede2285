"""Shared fixtures: one real demo-model engine for the whole test session.

Every test that generates text uses ``engine``: the process-wide session with the demo model,
loaded once. Whatever an earlier test unloaded or switched, each test that uses it starts with
exactly the configuration the run started with (``demo_engine.restore``: the same ``EngineConfig``,
requested arguments and an awake engine; a bare ``load()`` would keep any live demo-model engine).
Sampling defaults are reset after each test so that one test's settings never leak into the next.

Timeouts (pytest-timeout, configured in pyproject.toml): a test that waits forever fails alone,
with the stack of every thread, instead of hanging the run.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile

import pytest

import demo_engine
from vllm_magic import get_session


# Persisted engines (%vllm_load --persist) of this run live in a runtime directory of its own, inherited by
# every kernel it starts (nbval's too): the run never attaches to, or stops, the user's own engines.
RUNTIME = tempfile.mkdtemp(prefix="vmrt-")
os.environ["VLLM_MAGIC_RUNTIME"] = RUNTIME


def pytest_sessionfinish(session, exitstatus):
    from vllm_magic.engine.backends import persisted
    from pathlib import Path

    for engine in persisted.engines(Path(RUNTIME)):
        engine.stop()
    shutil.rmtree(RUNTIME, ignore_errors=True)


def _nvidia_gpus() -> int:
    """How many NVIDIA GPUs NVML sees (0 without a driver): no CUDA context is created."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def pytest_addoption(parser):
    parser.addoption("--require-gpu", action="store_true",
                     help="fail instead of skipping the gpu tests where no NVIDIA GPU is visible (make test-gpu)")


def pytest_collection_modifyitems(config, items):
    # Tests marked browser drive JupyterLab in Chromium through Playwright, which `make test` installs; a
    # machine without it (the GPU machine: no Playwright, no network to get Chromium) skips them, saying so.
    import importlib.util

    if importlib.util.find_spec("playwright") is None:
        no_browser = pytest.mark.skip(reason="no browser here: Playwright is not installed")
        for item in items:
            if item.get_closest_marker("browser"):
                item.add_marker(no_browser)
    # Tests marked gpu run on an NVIDIA GPU only: the one reason a test here may be skipped.
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    config.stash[_GPU_SKIPPED] = 0
    if gpu_items and _nvidia_gpus() == 0:
        if config.getoption("--require-gpu"):
            raise pytest.UsageError("--require-gpu: no NVIDIA GPU is visible (NVML), so the gpu tests cannot run")
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
        for item in gpu_items:
            item.add_marker(skip)
        config.stash[_GPU_SKIPPED] = len(gpu_items)


_GPU_SKIPPED = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # Said in every run without a GPU: there the sleep/keep/wake tests run against fakes of vLLM's
    # sleep mode, and nothing proves the real path (GiB given back, same tokens after waking) works.
    skipped = config.stash.get(_GPU_SKIPPED, 0)
    if skipped:
        terminalreporter.write_sep(
            "!", f"no NVIDIA GPU: {skipped} gpu test(s) skipped, so vLLM's real sleep/keep/wake path did NOT run "
                 "(CPU runs use fakes); run them on a GPU machine with `make test-gpu`", yellow=True, bold=True)


@pytest.fixture(scope="session")
def engine():
    """The kernel-wide session with the demo model loaded."""
    session = demo_engine.shared()
    yield session
    session.unload()


@pytest.fixture
def ip(engine):
    """A fresh IPython shell with the extension loaded over the shared demo engine (modules that
    need another shell define their own ``ip``)."""
    from ipython_capture import make_shell
    from vllm_magic.magics import unregister

    shell, _publisher = make_shell()
    shell.run_line_magic("load_ext", "vllm_magic")
    yield shell
    unregister(shell, shutdown=False)  # the engine is shared with other test modules
    type(shell).clear_instance()


@pytest.fixture(autouse=True)
def _demo_engine_stays(request):
    # Before the test rather than after: a module fixture may have unloaded it in its own teardown.
    if "engine" in request.fixturenames:
        demo_engine.restore()
    yield


@pytest.fixture(autouse=True)
def _reset_sampling_defaults():
    yield
    get_session().defaults.reset()


@pytest.fixture
def kernel_sigint():
    """SIGINT raises KeyboardInterrupt in the main thread, as in an IPython kernel.

    Event-loop runners used by earlier async tests can leave their own SIGINT handler installed;
    a kernel interrupt is simulated with ``_thread.interrupt_main()``, which goes through it.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
