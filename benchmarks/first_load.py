"""Time the first load of a model in a fresh process: ``python -m benchmarks.first_load [N] [ENGINE_ARGS_JSON]``.

Each of the N runs is a new Python process that imports vllm_magic, loads the demo model (or the
configuration given as JSON keyword arguments of ``session.load``), answers one greedy question and
decodes one 128-token stream. It prints one JSON line per run: ``load_s`` (what ``%vllm_load``
reports: vLLM's import and the engine's start), ``process_s`` (from the process's first line),
the greedy answer's token ids (to compare configurations) and the decode rate.
"""

from __future__ import annotations

import subprocess
import sys
import time


def one_load(engine_args: dict) -> dict:
    started = time.perf_counter()
    from vllm_magic import get_session

    session = get_session()
    info = session.load(**engine_args)
    loaded = time.perf_counter()
    answer = session.generate("What is the capital of France?", temperature=0, max_tokens=16)
    stream = session.submit("Explain, step by step, how a rainbow forms.", temperature=0, max_tokens=128,
                            ignore_eos=True)[0].result()
    row = {"load_s": round(info.seconds, 1), "process_s": round(loaded - started, 1),
           "greedy_ids": answer.token_ids, "decode_tok_s": round(stream.tokens_per_second or 0, 1),
           "engine_processes": len(getattr(session.backend, "children", ()))}
    session.unload()
    return row


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    engine_args = sys.argv[2] if len(sys.argv) > 2 else "{}"
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", "import json, sys; from benchmarks.first_load import one_load; "
                              "print(json.dumps(one_load(json.loads(sys.argv[1]))))", engine_args],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
