"""Hub models on a machine without network, timed in fresh real kernels.

``python -m benchmarks.hub_download [--rounds 3]`` prints, per round:

* how long ``%vllm_load Qwen/Qwen2.5-0.5B-Instruct --max-model-len 4096`` takes to fail in a fresh
  kernel with an empty Hugging Face cache and the default endpoint (huggingface.co), and the line it
  shows; then the same through ``VLLM(model=...)`` in that kernel (vLLM already imported);
* a download from the local Hub stand-in (tests/hub_standin.py, throttled to 100 MB/s) of the demo
  model's files through ``%vllm_download``: the progress lines the cell showed, as captured.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hub_standin import HubStandIn  # noqa: E402
from real_kernel import RealKernel  # noqa: E402

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def _unreachable_round(tmp: Path) -> None:
    os.environ["HF_HOME"] = str(tmp / "hf-home")
    os.environ.pop("HF_ENDPOINT", None)
    kernel = RealKernel(tmp)
    try:
        kernel.ok("%load_ext vllm_magic\n%config VllmMagics.show_controls = False")
        start = time.perf_counter()
        run = kernel.execute(f"%vllm_load {MODEL} --max-model-len 4096")
        load = time.perf_counter() - start
        print(f"%vllm_load, fresh kernel: {load:.2f} s -> {run.error[0]}: {run.error[1]}")
        start = time.perf_counter()
        run = kernel.execute(f"from vllm_magic.langchain import VLLM\nVLLM(model={MODEL!r})")
        print(f"VLLM(model=...), same kernel: {time.perf_counter() - start:.2f} s -> {run.error[0]}")
    finally:
        kernel.shutdown()


def _progress_round(tmp: Path) -> None:
    from vllm_magic import prepare_demo_model

    os.environ["HF_HOME"] = str(tmp / "hf-home-progress")
    with HubStandIn({"HuggingFaceTB/SmolLM2-135M-Instruct": prepare_demo_model(quiet=True)}) as hub:
        hub.rate = 100e6
        os.environ["HF_ENDPOINT"] = hub.url
        kernel = RealKernel(tmp)
        try:
            kernel.ok("%load_ext vllm_magic")
            run = kernel.execute("%vllm_download HuggingFaceTB/SmolLM2-135M-Instruct")
            for text in dict.fromkeys(t for t in run.texts if t):
                print("  " + text)
        finally:
            kernel.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            print(f"round {round_ + 1}")
            _unreachable_round(Path(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        print("download from the local Hub stand-in at 100 MB/s, as the cell showed it:")
        _progress_round(Path(tmp))


if __name__ == "__main__":
    main()
