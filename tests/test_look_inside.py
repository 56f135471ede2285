"""Logprobs, the prefix cache, branches and grids against the real demo-model engine (the shared one)."""

from __future__ import annotations

import math

import pytest
from IPython.core.error import UsageError

from vllm_magic.engine.requests.grid import grid_settings, parse_grid_flag
from vllm_magic.engine.requests.prompts import TokenPrompt
from vllm_magic.errors import RequestError

QUESTION = "What is the capital of France?"
# Longer than several KV cache blocks: the prefix cache serves whole blocks.
PASSAGE = ("The river Seine flows through Paris, past the Louvre, Notre-Dame and the Eiffel Tower, and on to "
           "the sea at Le Havre. ") * 8 + "In one sentence: which city does the river flow through?"


def test_greedy_logprobs_rank_first_and_match_the_prompt_logprobs_of_the_same_text(engine):
    answer = engine.generate(QUESTION, temperature=0, max_tokens=24, logprobs=3)
    assert answer.logprobs is not None and len(answer.logprobs) == len(answer.token_ids) > 3
    for position, token_id in zip(answer.logprobs, answer.token_ids):
        assert position.token_id == token_id and position.rank == 1
        assert len(position.top) == 3 and position.top[0].token_id == token_id
        assert [c.rank for c in position.top] == [1, 2, 3]
        assert position.top[0].logprob >= position.top[1].logprob >= position.top[2].logprob
    # The tokens' texts make the answer, then the end-of-turn token that ended it.
    assert "".join(p.text for p in answer.logprobs[:-1]).strip() == answer.text.strip()
    assert answer.finish_reason == "stop" and answer.logprobs[-1].text == "<|im_end|>"
    # The same tokens sent back as a prompt: the model scores each one as it did while generating.
    back = engine.generate(TokenPrompt(answer.prompt_token_ids + answer.token_ids), temperature=0, max_tokens=1,
                           prompt_logprobs=2)
    assert back.prompt_token_ids == answer.prompt_token_ids + answer.token_ids
    scored = back.prompt_logprobs[len(answer.prompt_token_ids):]
    assert back.prompt_logprobs[0] is None and len(scored) == len(answer.logprobs)
    for again, first in zip(scored, answer.logprobs):
        assert again.token_id == first.token_id and again.rank == 1
        assert again.logprob == pytest.approx(first.logprob, abs=5e-3)  # prefill and decode kernels differ
    assert answer.perplexity == pytest.approx(math.exp(-sum(p.logprob for p in answer.logprobs) / len(answer.logprobs)))
    assert answer.perplexity >= 1.0 and answer.mean_logprob <= 0
    assert answer.logprobs_mode == "raw_logprobs" and "raw" in answer.logprobs_kind
    assert "perplexity" in answer.summary


def test_without_logprobs_nothing_is_computed_and_zero_gives_the_tokens_own(engine):
    plain = engine.generate(QUESTION, temperature=0, max_tokens=8)
    assert plain.logprobs is None and plain.prompt_logprobs is None and plain.perplexity is None
    assert "perplexity" not in plain.summary
    own = engine.generate(QUESTION, temperature=0, max_tokens=8, logprobs=0)
    assert [p.token_id for p in own.logprobs] == own.token_ids and all(p.top == () for p in own.logprobs)


def test_the_prefix_cache_serves_a_repeated_long_prompt_and_the_stats_line_says_so(engine):
    first = engine.generate(PASSAGE, temperature=0, max_tokens=4)
    again = engine.generate(PASSAGE, temperature=0, max_tokens=4)
    block = engine.backend.block_size
    assert first.prompt_tokens > block
    # Everything but the last, partial block comes from the cache the second time.
    assert again.cached_tokens == (again.prompt_tokens - 1) // block * block > 0
    assert f"{again.cached_tokens} of {again.prompt_tokens} prompt tokens cached" in again.summary


def test_a_branch_continues_from_exactly_the_chosen_token_and_reuses_the_cached_prefix(ip, engine):
    result = ip.run_cell_magic("vllm", "-t 0 -m 24 --logprobs 4 --quiet", PASSAGE)
    explorer = result.explore()
    position = 2
    alternative = explorer.focus(position).alternatives()[0]
    branch = explorer.branch(position, alternative)
    assert branch.token_ids[:position + 1] == result.token_ids[:position] + [alternative.token_id]
    assert branch.token_ids[position] != result.token_ids[position]
    assert branch.logprobs[position].token_id == alternative.token_id
    assert branch.text.startswith("".join(t.text for t in result.logprobs[:position]) + alternative.text)
    assert len(branch.token_ids) > position + 1  # it went on after the chosen token
    # The branch's prompt (the passage and the answer's first tokens) comes from the cache.
    block = engine.backend.block_size
    assert branch.cached_tokens >= (result.prompt_tokens + position) // block * block > 0
    assert explorer.results == [result, branch] and explorer.current == 1
    # A branch of the branch; then the tree is walked back.
    deeper = explorer.branch(position + 2, branch.logprobs[position + 2].alternatives()[0])
    assert deeper.token_ids[:position + 1] == branch.token_ids[:position + 1]
    assert [b.parent for b in explorer.branches] == [None, 0, 1]
    explorer._to_parent()
    assert explorer.result is branch
    explorer.select(0)
    assert explorer.result is result and "branch-point" not in explorer.html()
    assert "coloured by probability" in explorer.html() and explorer.html().count('class="vllm-token"') == len(
        result.token_ids)
    explorer.close()


def test_the_branch_keeps_the_answers_sampling_settings(engine):
    from vllm_magic.magics.results import VllmResult
    from vllm_magic.widgets.explorer import TokenExplorer

    handle = engine.submit(QUESTION, temperature=0, max_tokens=10, logprobs=2)[0]
    result = VllmResult(handle.result(timeout=600), QUESTION, handle.sampling_params)
    explorer = TokenExplorer(result, engine)
    branch = explorer.branch(1, result.logprobs[1].alternatives()[0])
    params = branch.sampling_params
    assert params.temperature == 0 and params.logprobs == 2 and params.max_tokens == 10 - 2
    assert len(branch.token_ids) <= 10 and branch.logprobs[-1].top  # alternatives all along
    with pytest.raises(RequestError, match="not one of the alternatives"):
        explorer.branch(1, "no such token here")
    explorer.close()


def test_a_grid_of_three_by_two_settings_over_two_prompts_is_one_submission_of_twelve(engine):
    submissions = engine.submissions
    grid = engine.grid([QUESTION, "Name a colour."], {"temperature": [0, 0.7, 1.2], "top_p": [0.9, 1.0]},
                       max_tokens=8, seed=0)
    assert engine.submissions == submissions + 1
    results = grid.results()
    assert len(grid) == 12 and [len(row) for row in results] == [2] * 6
    assert [s["temperature"] for s in grid.settings] == [0.0, 0.0, 0.7, 0.7, 1.2, 1.2]
    for setting, row in zip(grid.settings, grid.handles):
        for handle in row:
            assert handle.sampling_params.temperature == setting["temperature"]
            assert handle.sampling_params.max_tokens == 8
            if setting["temperature"] > 0:  # greedy sampling has no top_p (vLLM sets it to 1)
                assert handle.sampling_params.top_p == setting["top_p"]
    greedy = engine.generate(QUESTION, temperature=0, max_tokens=8)
    assert results[0][0].token_ids == greedy.token_ids == results[1][0].token_ids
    assert all(r.logprobs is not None and r.output_tokens for row in results for r in row)
    rows = grid.rows()
    assert len(rows) == 12 and {"prompt", "temperature", "top_p", "text", "tokens", "ttft", "mean_logprob"} <= set(rows[0])
    table = grid._repr_html_()
    assert table.count("<tr>") == 3 and "temperature=0.7 · top_p=0.9" in table and "mean logprob" in table


def test_grid_cells_show_the_table_and_mistakes_are_one_line_before_anything_is_submitted(ip, engine):
    grid = ip.run_cell_magic("vllm", "-m 6 --grid temperature=0,1 --out g", f"{QUESTION}\n---\nName a colour.")
    assert grid is ip.user_ns["g"] and len(grid) == 4 and grid.done
    submissions = engine.submissions
    limit = engine.backend.max_num_seqs
    too_many = limit // 2 + 1  # seeds, x 2 prompts: more requests than the engine runs at once
    for line, message in [
        ("--grid colour=1,2", "colour is not a sampling option a grid can vary"),
        ("--grid temperature=0,3", "temperature values are between 0.0 and 2.0, not 3.0"),
        ("--grid top_k=0,x", "'x' is not a number"),
        ("--grid temperature", "write an option and its values"),
        ("--grid temperature=0,1 -t 0.5", "temperature is both varied by the grid and fixed"),
        ("--grid temperature=0 --grid temperature=1", "given twice"),
        ("--grid temperature=0,1 --explore", "drop --explore"),
        (f"--grid seed={','.join(str(n) for n in range(too_many))}",
         f"= {2 * too_many} requests, more than this engine runs at once ({limit}"),
        ("--logprobs 21", "at most 20 logprobs per token (vLLM's max_logprobs), not 21; load it with --max-logprobs 21"),
        ("--prompt-logprobs 30", "--prompt-logprobs 30: this engine returns at most 20"),
        ("--logprobs -2", "0 or more"),
    ]:
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ip.run_cell_magic("vllm", line, f"{QUESTION}\n---\nName a colour.")
    assert engine.submissions == submissions
    assert engine.generate(QUESTION, temperature=0, max_tokens=4).text  # the engine still serves


def test_grid_flags_read_each_options_type():
    assert parse_grid_flag("temperature=0,0.7") == ("temperature", [0.0, 0.7])
    assert parse_grid_flag("top-k=1, 5") == ("top_k", [1, 5])
    assert parse_grid_flag("seed=1,none") == ("seed", [1, None])
    assert parse_grid_flag("ignore_eos=true,false") == ("ignore_eos", [True, False])
    assert parse_grid_flag("lora=base, pirate") == ("lora", ["base", "pirate"])  # adapters by name
    assert grid_settings({"lora": ["base", "pirate"]}) == [{"lora": "base"}, {"lora": "pirate"}]
    assert grid_settings({"temperature": [0, 1], "n": [1, 2]}) == [
        {"temperature": 0.0, "n": 1}, {"temperature": 0.0, "n": 2}, {"temperature": 1.0, "n": 1},
        {"temperature": 1.0, "n": 2}]
    for axes, message in [({}, "at least one option"), ({"stop": [["a"]]}, "not a sampling option"),
                          ({"n": [0]}, "1 or more"), ({"temperature": []}, "a list of values"),
                          ({"temperature": 0.5}, "a list of values"), ({"lora": [3]}, "name registered adapters")]:
        with pytest.raises(RequestError, match=message):
            grid_settings(axes)


def test_explore_cell_shows_the_explorer_and_asks_for_alternatives(ip):
    from vllm_magic.widgets.explorer import TokenExplorer

    result = ip.run_cell_magic("vllm", "-t 0 -m 8 --explore --quiet", QUESTION)
    assert len(result.logprobs[0].top) == 5  # --explore asks for 5 unless the cell says
    explorer = TokenExplorer(result)
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/html"].count('class="vllm-token"') == len(result.token_ids)
    assert bundle["text/plain"] == f"TokenExplorer({len(result.token_ids)} tokens, 1 path)"
    plain = ip.run_cell_magic("vllm", "-t 0 -m 4 --quiet", QUESTION)
    with pytest.raises(RequestError, match="needs the answer's logprobs"):
        plain.explore()
    explorer.close()


def test_langchain_logprobs_fields_are_filled_in_openais_shapes(engine):
    from vllm_magic.langchain import VLLM, ChatVLLM

    llm = VLLM.from_session(engine, temperature=0, max_tokens=8, logprobs=2)
    info = llm.generate([QUESTION]).generations[0][0].generation_info
    logprobs = info["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    # The answer's visible tokens (the end-of-turn token that stopped it left out, as OpenAI does).
    assert "".join(logprobs["tokens"]) == llm.invoke(QUESTION)
    assert len(logprobs["tokens"]) == info["completion_tokens"] - (info["finish_reason"] == "stop")
    assert all(len(t) == 2 for t in logprobs["top_logprobs"])
    chat = ChatVLLM.from_session(engine, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    message = chat.invoke(QUESTION)
    content = message.response_metadata["logprobs"]["content"]
    assert len(content) == message.usage_metadata["output_tokens"] - (message.response_metadata["finish_reason"] == "stop")
    assert {"token", "logprob", "bytes", "top_logprobs"} <= set(content[0]) and len(content[0]["top_logprobs"]) == 3
    assert "".join(c["token"] for c in content) == message.content
    streamed = None
    for chunk in chat.stream(QUESTION):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.response_metadata["logprobs"]["content"] == content
    # Per call, as ChatOpenAI takes it; and none unless asked.
    plain = ChatVLLM.from_session(engine, temperature=0, max_tokens=8)
    assert "logprobs" not in plain.invoke(QUESTION).response_metadata
    asked = plain.invoke(QUESTION, logprobs=True, top_logprobs=1).response_metadata["logprobs"]["content"]
    assert [len(c["top_logprobs"]) for c in asked] == [1] * len(asked)
