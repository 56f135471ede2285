"""What the prefix cache gives the look-inside tools, and what logprobs cost, paired per round.

``python -m benchmarks.look_inside [--rounds 3] [--model DIR] [--json PATH]`` loads the model (the
demo model by default) in this process and measures, each round:

* **branch**: the explorer's branch from token 16 of a greedy answer to a question about a long
  passage (about 1,000 prompt tokens): its time to first token, with the prefix cache as the
  answer left it, against the answer's own (prefix cache emptied first), and against the same
  branch with the prefix cache emptied (the control: what the cache saves);
* **continue**: ten ``%%vllm --continue`` turns of a conversation (48 tokens each): turn 10's time to
  first token against turn 1's, and turn 10's prompt with the prefix cache emptied (the control);
* **logprobs**: the decode rate of 128 greedy tokens with ``logprobs=5`` against without, in turn,
  through the session and in raw vLLM's own ``step()`` loop (what logprobs cost vLLM itself).

Times to first token are the engine's (``result.ttft``: from submission to the first token). Ratios
are medians of the per-round ratios.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .frontends import RecordingShell, Workload, fresh_prefix_cache, stream_raw_steps
from .rounds import median_ratio, medians_of, note_round, print_tables, results, write_json

PASSAGE = " ".join(
    f"Chapter {i}: the harbour of Saint-Malo at {['dawn', 'noon', 'dusk', 'night'][i % 4]} held "
    f"{i + 3} fishing boats, {2 * i + 1} yachts and a ferry to Jersey; the tide rose {i % 5 + 4} metres "
    "and the walls of the old town kept the wind off the quays where sailors mended their nets."
    for i in range(20))
QUESTION = "Read the chapters above. How many fishing boats did the harbour hold in chapter 7, and at what time?"
TURNS = [
    "My name is Ada and I like to sail. Tell me about the sea near Brittany.",
    "What should I pack for a day of sailing there?",
    "Which harbour would you start from?",
    "How do tides change the plan?",
    "What if the wind turns?",
    "Name a good place for lunch on the water.",
    "How long would the trip back take?",
    "What do I do if fog comes in?",
    "Which boat should I rent?",
    "And what is my name?",
]
BRANCH_AT = 16


def _fresh(session: Any) -> None:
    session.run_on_engine(fresh_prefix_cache)


def branch_round(session: Any) -> dict[str, float]:
    from vllm_magic.magics.results import VllmResult
    from vllm_magic.widgets.explorer import TokenExplorer

    _fresh(session)
    handle = session.submit(f"{PASSAGE}\n\n{QUESTION}", temperature=0, max_tokens=48, logprobs=5)[0]
    answer = VllmResult(handle.result(timeout=900), QUESTION, handle.sampling_params)
    explorer = TokenExplorer(answer, session)
    alternative = answer.logprobs[BRANCH_AT].alternatives()[0]
    cached = explorer.branch(BRANCH_AT, alternative)
    explorer.select(0)
    _fresh(session)
    uncached = explorer.branch(BRANCH_AT, alternative)
    explorer.close()
    return {"prompt_tokens": answer.prompt_tokens, "answer_ttft_ms": answer.ttft * 1000,
            "branch_ttft_ms": cached.ttft * 1000, "branch_cached_tokens": cached.cached_tokens or 0,
            "branch_prompt_tokens": answer.prompt_tokens + BRANCH_AT + 1,
            "uncached_branch_ttft_ms": uncached.ttft * 1000, "uncached_branch_cached_tokens": uncached.cached_tokens or 0}


def continue_round(session: Any) -> dict[str, float]:
    shell = RecordingShell.instance()
    shell.bind(session)
    shell.ip.run_line_magic("vllm_reset", "")
    _fresh(session)
    results = []
    for turn in TURNS:
        shell.run(f"%%vllm -t 0 -m 48 --continue --quiet --out _turn\n{turn}")
        results.append(shell.ip.user_ns["_turn"])
    last = results[-1]
    _fresh(session)
    control = session.generate(last.messages, temperature=0, max_tokens=48)
    return {"turn1_ttft_ms": results[0].ttft * 1000, "turn10_ttft_ms": last.ttft * 1000,
            "turn1_prompt_tokens": results[0].prompt_tokens, "turn10_prompt_tokens": last.prompt_tokens,
            "turn10_cached_tokens": last.cached_tokens or 0, "uncached_turn10_ttft_ms": control.ttft * 1000}


def logprobs_round(session: Any) -> dict[str, float]:
    prompt = "Tell me a long story about the sea."
    plain = session.generate(prompt, temperature=0, max_tokens=128, ignore_eos=True)
    with_logprobs = session.generate(prompt, temperature=0, max_tokens=128, ignore_eos=True, logprobs=5)
    row = {"decode_tok_s": plain.tokens_per_second, "decode_logprobs5_tok_s": with_logprobs.tokens_per_second}
    if session.backend.kind == "local":  # the same stream in raw vLLM's step loop: what logprobs cost vLLM itself
        workload = Workload(session, [prompt], 128, prompt, 128)
        row["raw_decode_tok_s"] = stream_raw_steps(workload).extra["decode"]
        row["raw_decode_logprobs5_tok_s"] = stream_raw_steps(workload, logprobs=5).extra["decode"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=None, help="model to load (default: the demo model)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rounds and ratios here")
    args = parser.parse_args()

    from vllm_magic import get_session

    session = get_session()
    info = session.load(args.model) if args.model else session.load()
    print(info.summary, file=sys.stderr)
    session.generate("Warm up.", max_tokens=8)  # the first request pays for compilation and caches
    rounds = {"branch": [], "continue": [], "logprobs": []}
    for number in range(1, args.rounds + 1):
        for name, measure in (("branch", branch_round), ("continue", continue_round), ("logprobs", logprobs_round)):
            row = measure(session)
            rounds[name].append(row)
            note_round(f"round {number} {name}", row)
    ratios = {
        "branch_ttft / answer_ttft": median_ratio(rounds["branch"], "branch_ttft_ms", "answer_ttft_ms"),
        "branch_ttft / uncached_branch_ttft": median_ratio(rounds["branch"], "branch_ttft_ms", "uncached_branch_ttft_ms"),
        "turn10_ttft / turn1_ttft": median_ratio(rounds["continue"], "turn10_ttft_ms", "turn1_ttft_ms"),
        "turn10_ttft / uncached_turn10_ttft": median_ratio(rounds["continue"], "turn10_ttft_ms",
                                                            "uncached_turn10_ttft_ms"),
        "decode with logprobs=5 / without": median_ratio(rounds["logprobs"], "decode_logprobs5_tok_s", "decode_tok_s"),
    }
    if "raw_decode_tok_s" in rounds["logprobs"][0]:
        ratios["raw vLLM: decode with logprobs=5 / without"] = median_ratio(
            rounds["logprobs"], "raw_decode_logprobs5_tok_s", "raw_decode_tok_s")
        ratios["session / raw vLLM, decode with logprobs=5"] = median_ratio(
            rounds["logprobs"], "decode_logprobs5_tok_s", "raw_decode_logprobs5_tok_s")
    status = session.status()
    print_tables(f"{status.model} on {status.platform} ({status.dtype}), vLLM {status.vllm_version}, "
                 f"{args.rounds} rounds", ratios, medians_of(rounds))
    write_json(args.json, results(status.model, status.platform, status.vllm_version, rounds, ratios,
                                  medians_of(rounds)))
    session.unload()


if __name__ == "__main__":
    main()
