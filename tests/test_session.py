"""The engine session against the real demo-model engine: requests, streaming, abort, interrupts."""

from __future__ import annotations

import _thread
import asyncio
import json
import re
import threading
import time
from contextlib import contextmanager

import pytest

from vllm_magic.engine.session import PromptTooLongError

QUESTION = "What is the capital of France?"


def test_second_load_with_the_same_arguments_reuses_the_engine(engine):
    created = engine.engines_created
    info = engine.load()
    assert info.already_loaded
    assert "already loaded" in info.summary
    assert engine.engines_created == created


def test_result_carries_text_tokens_and_metrics(engine):
    result = engine.generate("What is the capital of France?", temperature=0, max_tokens=32)
    assert "Paris" in result.text
    assert result.token_ids and result.output_tokens == len(result.token_ids)
    assert result.finish_reason == "stop"
    assert result.prompt_tokens == len(result.prompt_token_ids) > 5
    assert "What is the capital of France?" in result.prompt  # the chat-templated text sent
    assert 0 < result.ttft < result.elapsed
    assert result.tokens_per_second > 0
    tokenizer = engine.llm.get_tokenizer()
    assert tokenizer.decode(result.token_ids, skip_special_tokens=True).strip() == result.text.strip()


def test_streaming_deltas_join_to_the_final_text_and_arrive_early(engine):
    handle = engine.submit("Write a long story about a dragon.", temperature=0, max_tokens=64, ignore_eos=True)[0]
    deltas, done_at_first_delta = [], None
    for delta in handle:
        if done_at_first_delta is None:
            done_at_first_delta = handle.done
        deltas.append(delta)
    result = handle.result(timeout=300)
    assert done_at_first_delta is False, "the first delta only came after the request finished"
    assert len(deltas) > 1
    assert "".join(deltas) == result.text
    assert result.output_tokens == 64


def test_raw_completion_skips_the_chat_template(engine):
    prompt = "The capital of France is"
    result = engine.generate(prompt, raw=True, temperature=0, max_tokens=8)
    assert result.prompt == prompt
    assert result.prompt_token_ids == list(engine.llm.get_tokenizer().encode(prompt))
    assert result.output_tokens > 0


def test_system_prompt_reaches_the_template(engine):
    text = engine.render_prompt("Hi", system="You are a pirate.")
    assert "You are a pirate." in text and "Hi" in text
    engine.defaults.system_prompt = "Answer in French."
    assert "Answer in French." in engine.render_prompt("Hi")


def test_many_prompts_in_one_submission(engine):
    before = engine.submissions
    handles = engine.submit(["Say hi.", "Count to three.", "What is 2+2?"], temperature=0, max_tokens=12)
    assert engine.submissions == before + 1
    results = [h.result(timeout=300) for h in handles]
    assert len({r.request_id for r in results}) == 3
    assert all(r.output_tokens > 0 for r in results)


def test_n_gives_n_completions_and_counts_all_their_tokens(engine):
    result = engine.generate("Name a colour.", temperature=1.0, n=3, max_tokens=8, seed=1)
    assert len(result.completions) == 3
    assert all(c.token_ids for c in result.completions)
    assert result.output_tokens == sum(len(c.token_ids) for c in result.completions)


def test_seed_makes_sampling_repeatable(engine):
    a = engine.generate("Invent a name for a cat.", temperature=1.0, seed=1234, max_tokens=12)
    b = engine.generate("Invent a name for a cat.", temperature=1.0, seed=1234, max_tokens=12)
    assert a.text == b.text


def test_json_schema_output_parses_and_fits_the_schema(engine):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "is_capital": {"type": "boolean"}},
              "required": ["city", "is_capital"]}
    result = engine.generate("Describe Paris as JSON.", temperature=0, json_schema=schema, max_tokens=200)
    assert result.finish_reason == "stop", result.text
    value = json.loads(result.text)
    assert result.parsed == value
    assert isinstance(value["city"], str) and isinstance(value["is_capital"], bool)


def test_regex_and_choice_constrain_the_output(engine):
    result = engine.generate("Give me a year.", temperature=0, regex=r"(19|20)\d\d", max_tokens=8)
    assert re.fullmatch(r"(19|20)\d\d", result.text)
    result = engine.generate("Is the sky blue?", temperature=0, choice=["yes", "no"])
    assert result.text in ("yes", "no")


def test_prompt_longer_than_the_context_is_refused_and_the_engine_keeps_serving(engine):
    with pytest.raises(PromptTooLongError, match="tokens but the model's context holds"):
        engine.submit("word " * 20_000, temperature=0)
    assert "Paris" in engine.generate("What is the capital of France?", temperature=0).text


_TOKENIZE_PROMPTS = [
    "What is the capital of France?",
    "  leading and trailing spaces  ",
    "Unicode: café, naïve, 東京, emoji 🚀",
    "Line one\nLine two\n\n   indented",
    "<|im_start|> looks like a special token",
    "x",
]


def _one_by_one(tokenizer, item, raw, system):
    """Today's per-prompt preparation, written out: the reference the batched path must match."""
    if isinstance(item, str) and raw:
        return item, list(tokenizer.encode(item))
    messages = [{"role": "user", "content": item}] if isinstance(item, str) else [dict(m) for m in item]
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, list(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("raw", [False, True], ids=["chat", "raw"])
def test_batched_tokenization_matches_one_prompt_at_a_time(engine, raw):
    tokenizer = engine.llm.get_tokenizer()
    items = list(_TOKENIZE_PROMPTS)
    if not raw:  # conversations (one with its own system message) mixed with plain strings
        items.append([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "And now?"}])
        items.append([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Why?"}])
    system = "You are a careful assistant."
    handles = engine.submit(items, raw=raw, system=system, temperature=0, max_tokens=1)
    for handle in handles:
        handle.result(timeout=300)
    expected = [_one_by_one(tokenizer, item, raw, system) for item in items]
    assert [(h.prompt, h.prompt_token_ids) for h in handles] == expected
    # A single prompt (not batched) gives the same text and ids as it does inside the batch.
    for item, handle in zip(items, handles):
        single = engine.submit(item, raw=raw, system=system, temperature=0, max_tokens=1)[0]
        single.result(timeout=300)
        assert (single.prompt, single.prompt_token_ids) == (handle.prompt, handle.prompt_token_ids)
        assert engine.render_prompt(item, raw=raw, system=system) == handle.prompt


def test_one_too_long_prompt_in_a_batch_refuses_the_whole_batch(engine):
    live, submissions = engine.status().requests_live, engine.submissions
    with pytest.raises(PromptTooLongError, match="tokens but the model's context holds"):
        engine.submit(["Hello", "word " * 20_000, "Bye"], temperature=0)
    assert engine.status().requests_live == live
    assert engine.submissions == submissions  # not even the prompts before the long one were sent


def test_max_tokens_is_bounded_by_the_room_left_in_the_context(engine, monkeypatch):
    max_len = engine.status().max_model_len
    driver = engine.backend.driver
    sent = []  # the SamplingParams that reach the engine
    real_add = driver.add

    def spy(items):
        sent.extend(params for _handle, _prompt, params, _lora in items)
        return real_add(items)

    monkeypatch.setattr(driver, "add", spy)
    handle = engine.submit("Hello", temperature=0, max_tokens=max_len * 2)[0]
    assert handle.wait_for_delta(0, timeout=60), "the request produced nothing"
    handle.abort()
    result = handle.result(timeout=60)
    assert [params.max_tokens for params in sent] == [max_len - len(handle.prompt_token_ids)]
    assert result.error is None and result.output_tokens > 0  # the engine took the bounded request
    assert engine.status().requests_live == 0


def test_abort_keeps_what_was_generated(engine):
    handle = engine.submit("Write a long story about a dragon.", temperature=0, max_tokens=400, ignore_eos=True)[0]
    assert handle.wait_for_delta(0, timeout=120), "no text came"
    handle.abort()
    result = handle.result(timeout=300)
    assert result.aborted and result.finish_reason == "abort"
    assert 0 < result.output_tokens < 400
    assert engine.status().requests_live == 0


def test_abort_all_stops_every_request_in_flight(engine):
    handles = engine.submit(["Tell a long story."] * 4, temperature=0, max_tokens=400, ignore_eos=True)
    assert handles[0].wait_for_delta(0, timeout=120), "no text came"
    assert engine.abort_all() == 4
    results = [h.result(timeout=60) for h in handles]
    assert all(r.aborted and r.finish_reason == "abort" and r.output_tokens < 400 for r in results)
    assert engine.status().requests_live == 0


@contextmanager
def _ctrl_c_after_first_delta(handle):
    """Ctrl-C in the main thread once ``handle`` has streamed its first text: the request's own
    progress triggers it, not a timer. A test that leaves the block early (a failure, a timeout)
    gets no interrupt later, in another test."""
    leaving = threading.Event()

    def interrupt() -> None:
        deadline = time.monotonic() + 120
        while not leaving.is_set() and time.monotonic() < deadline:
            if handle.wait_for_delta(0, timeout=0.5):  # short slices: notices the test leaving
                if not leaving.is_set() and not handle.done:
                    _thread.interrupt_main()  # what the kernel's interrupt does: SIGINT in the main thread
                return

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    try:
        yield
    finally:
        leaving.set()
        try:
            thread.join(timeout=10)
        except KeyboardInterrupt:
            pass  # it fired just as the block was left: nothing is waiting for it any more


def test_interrupts_abort_and_leave_nothing_behind(engine, kernel_sigint):
    question = "What is the capital of France?"
    before = engine.generate(question, temperature=0, max_tokens=24).text
    for _ in range(10):
        handle = engine.submit("Write a very long story about a dragon.", temperature=0, max_tokens=500,
                               ignore_eos=True)[0]
        # Once its first text is there, 499 tokens are still to come: the interrupt lands while the
        # main thread waits in result().
        with _ctrl_c_after_first_delta(handle), pytest.raises(KeyboardInterrupt):
            handle.result(timeout=300)
        assert handle.done and handle.snapshot().aborted
        assert engine.status().requests_live == 0
    after = engine.generate(question, temperature=0, max_tokens=24)
    assert after.text == before
    assert not after.aborted


def test_concurrent_callers_each_get_their_own_answer(engine):
    """200 requests: 8 threads x 20 plus an asyncio task group of 40, all in flight together."""
    prompts = [f"Repeat after me: {word}." for word in (
        "apple", "river", "cloud", "tiger", "pencil", "window", "garden", "rocket", "violin", "castle")]
    params = dict(temperature=0, max_tokens=10)
    alone = {p: engine.generate(p, **params) for p in prompts}
    results: dict[int, tuple[str, object]] = {}
    lock = threading.Lock()
    start = threading.Barrier(9)

    def worker(t: int) -> None:
        start.wait(timeout=300)
        for j in range(20):
            k = t * 20 + j
            prompt = prompts[k % len(prompts)]
            result = engine.submit(prompt, **params)[0].result(timeout=300)
            with lock:
                results[k] = (prompt, result)

    async def async_group() -> None:
        async def one(k: int) -> None:
            prompt = prompts[k % len(prompts)]
            result = await engine.submit(prompt, **params)[0]
            results[k] = (prompt, result)

        async with asyncio.TaskGroup() as group:
            for k in range(160, 200):
                group.create_task(one(k))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    start.wait(timeout=300)
    asyncio.run(async_group())
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a caller thread never ended"
    assert sorted(results) == list(range(200)), "requests were lost"
    assert len({r.request_id for _, r in results.values()}) == 200
    for prompt, result in results.values():
        assert result.prompt_token_ids == alone[prompt].prompt_token_ids
        assert result.text == alone[prompt].text, f"{prompt!r} got {result.text!r}"


def test_status_reports_what_is_loaded(engine):
    served, tokens_out = engine.requests_served, engine.tokens_out
    result = engine.generate("Name a colour.", temperature=0, max_tokens=8)
    status = engine.status()
    assert status.loaded and status.model.endswith("SmolLM2-135M-Instruct")
    assert status.requests_served == served + 1 and status.tokens_out == tokens_out + result.output_tokens > 0
    assert status.memory_bytes and status.memory_bytes > 100 << 20
    assert status.uptime > 0 and status.load_seconds > 0
    assert "SmolLM2-135M-Instruct" in status._repr_markdown_()


def test_listeners_run_off_the_driver_thread_and_their_failures_are_reported(engine, capsys):
    calls = []

    def listener(result):
        calls.append((threading.current_thread().name, result.request_id))
        raise ValueError("listener bug")

    engine.add_listener(listener)
    try:
        first = engine.submit(QUESTION, temperature=0, max_tokens=4)[0]
        first.result(timeout=300)
        second = engine.submit(QUESTION, temperature=0, max_tokens=4)[0]
        second.result(timeout=300)
        engine.listeners.drain()
    finally:
        engine.remove_listener(listener)
    assert {thread for thread, _ in calls} == {"vllm-magic-listeners"}
    ours = [request_id for _, request_id in calls if request_id in (first.request_id, second.request_id)]
    assert ours == [first.request_id, second.request_id]
    err = capsys.readouterr().err
    assert err.count("failed after a request: ValueError: listener bug") == 1  # one line, not one per result
    assert "ValueError: listener bug" in engine.log.read(60)  # the traceback is in the log
    assert "Paris" in engine.generate(QUESTION, temperature=0, max_tokens=16).text


def test_a_listener_hears_only_of_results_notified_after_it_was_added():
    from vllm_magic.engine.listeners import Listeners

    listeners, heard, gate = Listeners(), [], threading.Event()
    listeners.add(lambda value: gate.wait(timeout=60))  # holds the listeners' thread until the checks are set up
    listeners.add(lambda value: heard.append(("early", value)))
    listeners.notify("before")
    late = lambda value: heard.append(("late", value))  # noqa: E731
    listeners.add(late)
    listeners.notify("after")
    gate.set()
    listeners.drain()
    assert heard == [("early", "before"), ("early", "after"), ("late", "after")]
    listeners.remove(late)
    listeners.notify("gone")
    listeners.drain()
    assert ("late", "gone") not in heard


def test_a_prompt_text_still_being_rendered_never_blocks_the_stream():
    from concurrent.futures import Future

    from vllm_magic.engine.requests.handles import RequestHandle

    text = Future()  # a server renders the text while the request runs
    handle = RequestHandle("vm-x", text, [1, 2, 3], 1, abort=lambda _id: None)
    pusher = threading.Thread(target=handle.push, args=(0, "Hello", [7], None))
    assert handle.snapshot().prompt == ""  # a running request's snapshot does not wait for the text
    pusher.start()
    pusher.join(timeout=60)
    assert not pusher.is_alive(), "pushing a delta waited for the prompt text"
    assert handle.snapshot().text == "Hello"
    text.set_result("<user>Hi</user>")
    handle.finish()
    assert handle.result(timeout=300).prompt == handle.prompt == "<user>Hi</user>"


def test_counters_include_a_request_as_soon_as_its_result_is_seen(engine):
    for _ in range(5):
        served = engine.requests_served
        result = engine.generate(QUESTION, temperature=0, max_tokens=2)
        assert engine.requests_served == served + 1 and engine.last_result.request_id == result.request_id
