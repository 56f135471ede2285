"""Hub models in real kernels, as a user meets them: the download's progress line in the cell, the
interrupt button during a download, and a model that loads afterwards without any network.

The Hub is the stand-in of :mod:`hub_standin` on 127.0.0.1 (``HF_ENDPOINT``), serving the demo model's
files as ``acme/SmolLM2-135M-Instruct``; each kernel has a Hugging Face cache of its own.
"""

from __future__ import annotations

import re

import pytest

from hub_standin import HubStandIn
from real_kernel import RealKernel
from test_kernel_interrupts import GREEDY, _answer_of

pytestmark = pytest.mark.timeout(1200)

DEMO_REPO = "acme/SmolLM2-135M-Instruct"  # HuggingFaceTB/... is what LangChain reads as the embedded demo model


@pytest.fixture
def demo_hub(tmp_path, monkeypatch):
    from vllm_magic import prepare_demo_model

    with HubStandIn({DEMO_REPO: prepare_demo_model(quiet=True)}) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        for name in ("HF_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        yield standin


@pytest.fixture
def kernel(tmp_path, demo_hub):
    kernel = RealKernel(tmp_path)  # after demo_hub: the kernel inherits its HF_ENDPOINT and HF_HOME
    kernel.ok("%load_ext vllm_magic\n%config VllmMagics.show_controls = False")
    yield kernel
    kernel.shutdown()


def _downloading(text: str) -> bool:
    return re.search(rf"⏳ downloading {DEMO_REPO}: [1-9][\d.]* MB of 541\.6 MB · \d of 7 files", text) is not None


def test_load_shows_download_progress_then_langchain_loads_it_again_without_network(kernel, demo_hub):
    demo_hub.hold_after(200 * 1000 ** 2)
    msg_id = kernel.start(f"%vllm_load {DEMO_REPO}")
    shown = kernel.wait_for_output(msg_id, _downloading)
    demo_hub.release()
    run = kernel.wait(msg_id)
    assert run.error is None, run.error
    assert run.final == [run.final[0]] and run.final[0].startswith(f"✓ {DEMO_REPO} loaded on "), (shown, run.final)
    assert "Paris" in _answer_of(kernel.execute(GREEDY))

    demo_hub.stop()  # no Hub any more: everything below comes from the cache
    asked = len(demo_hub.requests)
    out = kernel.ok("from vllm_magic.langchain import VLLM\n"
                    f"llm = VLLM(model={DEMO_REPO!r}, max_new_tokens=16, temperature=0)\n"
                    "print(llm.invoke('What is the capital of France?'))\n"
                    "print(get_ipython().run_line_magic('vllm_status', '').model)")
    assert "Paris" in out and out.strip().endswith(DEMO_REPO), out
    assert len(demo_hub.requests) == asked
    listing = kernel.ok("print(repr(get_ipython().run_line_magic('vllm_models', '')))")
    assert re.search(rf"{DEMO_REPO}  541\.6 MB  LlamaForCausalLM  vLLM runs it: yes  Hub cache", listing), listing


def test_interrupt_button_stops_a_download_and_the_next_one_resumes(kernel, demo_hub):
    demo_hub.hold_after(100 * 1000 ** 2)
    msg_id = kernel.start(f"%vllm_load {DEMO_REPO}")
    kernel.wait_for_output(msg_id, _downloading)
    kernel.interrupt()
    run = kernel.wait(msg_id)
    assert run.error is not None and run.error[0] == "UsageError", run.error
    assert re.fullmatch(rf"download of {DEMO_REPO} interrupted at [\d.]+ MB of 541\.6 MB; what it wrote stays in "
                        r"the cache and loading it again resumes the download", run.error[1]), run.error
    assert not [p for p in kernel.processes() if "vllm_magic.hub.worker" in " ".join(p.cmdline())]
    assert kernel.ok("print(get_ipython().run_line_magic('vllm_status', '').loaded)").strip() == "False"
    demo_hub.release()

    out = kernel.ok(f"%vllm_download {DEMO_REPO}")  # the files only: no engine needed to see the resume
    assert re.match(rf"✓ {DEMO_REPO} downloaded \(541\.6 MB\) in [\d.]+ s: ", out), out
    weights = [r for r in demo_hub.requests if r.path.endswith("/model.safetensors")]
    assert weights[-1].range and not weights[-1].range.startswith("bytes=0-"), weights[-1]
    assert kernel.ok(f"%vllm_download {DEMO_REPO}").startswith(f"{DEMO_REPO} is in the cache (541.6 MB): ")
