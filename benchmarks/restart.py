"""Restart to first answer: ``python -m benchmarks.restart [--rounds N] [--model M] [--engine-args JSON]``.

What Restart Kernel costs before the notebook answers again, in a real kernel started by
jupyter_client: ``restart_kernel()``, then the notebook's first cells (``%load_ext vllm_magic``, the
load cell, a greedy ``%%vllm`` question) until the answer is there. Two ways, paired in each round:

* ``cold``: ``%vllm_load`` (an engine in the kernel, started again after each restart);
* ``persisted``: ``%vllm_load --persist`` (the restarted kernel attaches to the running engine).

Each round restarts each kernel once and times it; the answer's text must be the same both ways.
Prints one JSON line per round and a markdown table of medians; the rows go to
``benchmarks/results/restart-TAG.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
QUESTION = "%%vllm -t 0 -m 16 --quiet --out answer\nWhat is the capital of France?"


class Kernel:
    """One python3 kernel of this interpreter, driven as JupyterLab drives it."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        from jupyter_client import KernelManager

        directory.mkdir(parents=True, exist_ok=True)
        self.km = KernelManager(kernel_name="python3", transport="ipc")
        self.km.connection_file = str(directory / "kernel.json")
        self.km.ip = str(directory / "ipc")
        self.km.start_kernel(env=env, extra_arguments=["--HistoryManager.enabled=False"])
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=300)

    def run(self, code: str) -> str:
        texts: list[str] = []

        def keep(msg: dict) -> None:
            content = msg["content"]
            if msg["msg_type"] == "stream":
                texts.append(content["text"])
            elif msg["msg_type"] in ("execute_result", "display_data"):
                texts.append(content.get("data", {}).get("text/plain", ""))
            elif msg["msg_type"] == "error":
                texts.append(f"{content['ename']}: {content['evalue']}")

        reply = self.kc.execute_interactive(code, output_hook=keep, timeout=1800, store_history=False)
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"{code!r} failed: {''.join(texts)[-500:]}")
        return "".join(texts)

    def restart(self) -> None:
        self.km.restart_kernel(now=False)
        self.kc.wait_for_ready(timeout=300)

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


def notebook(kernel: Kernel, load: str) -> tuple[str, str]:
    """The notebook's first cells; returns the load line and the answer."""
    kernel.run("%load_ext vllm_magic\n%config VllmMagics.show_controls = False")
    line = kernel.run(load).strip().splitlines()[-1]
    kernel.run(QUESTION)
    return line, kernel.run("print(answer.text)").strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.restart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="", help="model id or directory (default: the demo model)")
    parser.add_argument("--engine-args", default="", help="engine flags for %%vllm_load, as one string")
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    # A runtime directory each: the cold kernel's %vllm_load must not find the persisted engine.
    runtimes = {name: Path(tempfile.mkdtemp(prefix="vmrt-")) for name in ("cold", "persisted")}
    load = f"%vllm_load {args.model} {args.engine_args}".strip()
    work = Path(tempfile.mkdtemp(prefix="restart-bench-"))
    kernels = {name: Kernel(work / name, dict(os.environ, VLLM_MAGIC_RUNTIME=str(runtime)))
               for name, runtime in runtimes.items()}
    loads = {"cold": load, "persisted": load + " --persist"}
    rounds: list[dict[str, Any]] = []
    try:
        for name, kernel in kernels.items():  # the first load of each, not timed: both start an engine
            notebook(kernel, loads[name])
        for index in range(args.rounds):
            row: dict[str, Any] = {"round": index + 1}
            for name, kernel in kernels.items():
                start = time.perf_counter()
                kernel.restart()
                line, answer = notebook(kernel, loads[name])
                row[f"{name}_s"] = round(time.perf_counter() - start, 2)
                row[f"{name}_line"], row[f"{name}_answer"] = line, answer
            assert row["cold_answer"] == row["persisted_answer"], row
            row["ratio"] = round(row["cold_s"] / row["persisted_s"], 1)
            rounds.append(row)
            print(json.dumps(row), flush=True)
        kernels["persisted"].run("%vllm_unload --stop")
    finally:
        for kernel in kernels.values():
            kernel.shutdown()
        from vllm_magic.engine.backends import persisted

        for runtime in runtimes.values():
            for engine in persisted.engines(runtime):
                engine.stop()
            shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    cold = statistics.median(r["cold_s"] for r in rounds)
    warm = statistics.median(r["persisted_s"] for r in rounds)
    ratios = [r["ratio"] for r in rounds]
    print(f"\n| restart to first answer ({args.model or 'demo model'}) | seconds (median of {len(rounds)}) |\n|---|---|\n"
          f"| `%vllm_load` (engine in the kernel) | {cold:.1f} |\n| `%vllm_load --persist` (attach) | {warm:.1f} |\n"
          f"| cold / attach, paired per round | {statistics.median(ratios):.1f}x (range {min(ratios)}-{max(ratios)}) |")
    RESULTS.mkdir(exist_ok=True)
    tag = args.tag or f"restart-{Path(args.model).name or 'demo'}"
    (RESULTS / f"{tag}.json").write_text(json.dumps({"load": load, "rounds": rounds, "cold_median_s": cold,
                                                      "persisted_median_s": warm}, indent=1))


if __name__ == "__main__":
    main()
