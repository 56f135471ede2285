"""Serving and remote engines against real vLLM servers of the demo model.

One server (``demo_server``) is started the way ``%vllm_serve`` starts it and shared by this module;
tests that must break a server, or need one with an API key, start their own. Sessions attached to
a server are sessions of their own: the in-process demo engine (``engine``) keeps running beside
them, which is what lets a test compare the two.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import httpx
import pytest
from IPython.core.error import UsageError

from ipython_capture import make_shell
from polling import until as _until
from vllm_magic.engine.backends.server import ManagedServer
from vllm_magic.engine.session import EngineSession
from vllm_magic.errors import ServerError
from vllm_magic.magics import register, unregister

# Over the suite's 15 min default: vLLM servers started by the tests (a module one, and own ones in several
# tests).
pytestmark = pytest.mark.timeout(1800)

QUESTION = "What is the capital of France?"
PROMPTS = ["Name a color.", "Name a fruit.", "What is two plus two?", "Say hello in French.", QUESTION,
           "Name a planet."]


@pytest.fixture(scope="module")
def demo_server():
    owner = EngineSession()
    server = owner.serve(port=0)
    yield server
    owner.stop_server()
    assert not server.processes()


@pytest.fixture
def remote(demo_server):
    """A session of its own, attached to the demo server."""
    session = EngineSession()
    session.connect(demo_server.url)
    yield session
    session.unload()


@pytest.fixture
def shell():
    ip, publisher = make_shell()
    yield ip, publisher
    unregister(ip, shutdown=False)
    type(ip).clear_instance()


def _running_on(server_url: str) -> float:
    """Requests the server's engine is running now, from its Prometheus metrics."""
    text = httpx.get(f"{server_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


# ----- outside clients of a served engine -------------------------------------------------------------

def test_langchain_community_vllmopenai_answers_from_the_served_engine(demo_server):
    from langchain_community.llms import VLLMOpenAI

    options = dict(openai_api_key="EMPTY", openai_api_base=demo_server.url + "/v1",
                   model_name=demo_server.model_name, temperature=0, max_tokens=48)
    whole = VLLMOpenAI(**options).invoke("Rome is")
    stopped = VLLMOpenAI(**options, model_kwargs={"stop": ["."]}).invoke("Rome is")
    assert "." in whole, whole  # greedy: the answer has a sentence end to stop at
    assert stopped == whole.split(".")[0] and stopped.strip()  # the stop string reached the server


def test_openai_client_streams_the_same_greedy_answer_it_returns_whole(demo_server):
    from openai import OpenAI

    client = OpenAI(base_url=demo_server.base_url, api_key="EMPTY")
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model=demo_server.model_name, messages=messages, temperature=0,
                                           max_tokens=24).choices[0].message.content
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=demo_server.model_name, messages=messages, temperature=0, max_tokens=24, stream=True)
        if chunk.choices]
    assert "Paris" in whole
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == whole
    completion = client.completions.create(model=demo_server.model_name, prompt="Rome is", temperature=0,
                                           max_tokens=8).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=demo_server.model_name, prompt="Rome is", temperature=0, max_tokens=8, stream=True) if c.choices)
    assert completion.strip() and streamed == completion


# ----- %%vllm against --remote ----------------------------------------------------------------------

CELLS = [
    ("-t 0 -m 24", QUESTION),
    ("-t 0 -m 12", "Name a colour.\n---\nName a fruit.\n---\nName a planet."),
    ("-t 0 -m 64 --json '{\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, "
     "\"required\": [\"city\"]}'", "Which city is the capital of France? Answer in JSON."),
    ("-t 0 -m 16 --raw", "The capital of Italy is"),
]


def test_cells_against_remote_give_the_in_process_engines_greedy_answers(engine, demo_server, shell):
    ip, _ = shell
    register(ip, session=EngineSession())
    ip.run_line_magic("vllm_load", f"--remote {demo_server.url} --no-controls")
    remote = [ip.run_cell_magic("vllm", line + " --quiet", cell) for line, cell in CELLS]
    register(ip, session=engine)
    local = [ip.run_cell_magic("vllm", line + " --quiet", cell) for line, cell in CELLS]
    for (line, _), far, near in zip(CELLS, remote, local):
        far_list, near_list = (far, near) if isinstance(far, list) else ([far], [near])
        assert len(far_list) == len(near_list) > 0
        for a, b in zip(far_list, near_list):
            assert a.text == b.text, f"{line}: remote {a.text!r} != in-process {b.text!r}"
            assert a.token_ids == b.token_ids and a.prompt == b.prompt
            assert a.text.strip()
    assert remote[2].parsed == local[2].parsed and "city" in remote[2].parsed


def test_continue_and_sampling_flags_reach_the_server(demo_server, shell):
    ip, _ = shell
    session = EngineSession()
    register(ip, session=session)
    ip.run_line_magic("vllm_load", f"--remote {demo_server.url} --no-controls")
    first = ip.run_cell_magic("vllm", "-t 0 -m 24 --quiet --continue", "My name is Ada. Say hello to me.")
    second = ip.run_cell_magic("vllm", "-t 0 -m 24 --quiet --continue", "What is my name?")
    assert "My name is Ada" in second.prompt and first.text in second.prompt  # the conversation was sent
    assert second.text.strip()
    many = ip.run_cell_magic("vllm", "-t 1.0 -n 3 -m 8 --seed 1 --quiet", "Name an animal.")
    assert len(many.texts) == 3 and many.sampling_params.n == 3
    stopped = ip.run_cell_magic("vllm", "-t 0 -m 40 --stop Paris --quiet", QUESTION)
    assert "Paris" not in stopped.text and stopped.finish_reason == "stop"
    status = session.status()
    assert status.server == demo_server.url and status.requests_served == 4
    session.unload()


def test_langchain_objects_over_a_remote_session_answer(remote):
    from vllm_magic.langchain import VLLM, ChatVLLM

    llm = VLLM.from_session(remote, temperature=0, max_tokens=16)
    assert "Paris" in llm.invoke(QUESTION)
    assert "".join(llm.stream(QUESTION)) == llm.invoke(QUESTION)
    chat = ChatVLLM.from_session(remote, temperature=0, max_tokens=16)
    assert "Paris" in chat.invoke(QUESTION).content


def test_forced_tool_calls_and_the_reasoning_split_work_over_a_remote_session(engine, remote):
    """The parsing runs in the notebook's process: a server's answers are read as the engine's are."""
    from langchain_core.tools import tool

    from test_reasoning import THINK
    from vllm_magic.engine.config import Parsers
    from vllm_magic.langchain import ChatVLLM

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"sunny in {city}"

    question = "What is the weather in Paris?"
    over_server = ChatVLLM.from_session(remote, temperature=0, max_tokens=64)
    call = over_server.bind_tools([get_weather], tool_choice="any").invoke(question)
    local = ChatVLLM.from_session(engine, temperature=0, max_tokens=64).bind_tools([get_weather], tool_choice="any")
    assert [(c["name"], c["args"]) for c in call.tool_calls] == [(c["name"], c["args"])
                                                                 for c in local.invoke(question).tool_calls]
    assert call.tool_calls[0]["name"] == "get_weather" and isinstance(call.tool_calls[0]["args"]["city"], str)
    remote.parsers = Parsers(reasoning="qwen3")
    result = remote.submit("What is two plus two? Think first.", temperature=0, max_tokens=80, regex=THINK)[0].result(timeout=300)
    assert result.reasoning.strip() and result.text.strip()
    assert "<think>" not in result.text + result.reasoning and "</think>" not in result.text + result.reasoning


def test_widgets_over_a_remote_session_stream_and_stop_on_the_server(remote, demo_server):
    from vllm_magic.widgets import Playground, SamplingPanel

    playground = Playground(remote)
    try:
        playground.controls.controls["temperature"].value = 0.0
        playground.controls.controls["max_tokens"].value = 16
        run = playground.generate(QUESTION)
        playground.wait(timeout=120)
        assert "Paris" in run.result.text and "Paris" in playground.answer.value
        remote.defaults.max_tokens = 4000
        remote.defaults.temperature = 0.8
        run = playground.generate("Write a very long story about a dragon.")
        assert playground._handle.wait_for_delta(0, timeout=120), "no text came"
        panel = SamplingPanel(remote)
        assert panel.stop() == 1  # the panel's Stop button: every request of the session
        playground.wait(timeout=120)
        assert run.result.aborted and run.result.output_tokens < 4000
        _until(lambda: _running_on(demo_server.url) == 0)
        panel.close()
    finally:
        playground.close()


def test_an_aborted_remote_request_is_dropped_by_the_server(remote, demo_server):
    handle = remote.submit("Write a very long story about a dragon.", temperature=0.8, max_tokens=4000,
                           ignore_eos=True)[0]
    assert handle.wait_for_delta(after=3, timeout=120)
    _until(lambda: _running_on(demo_server.url) >= 1)
    handle.abort()
    result = handle.result(timeout=300)
    assert result.aborted and result.output_tokens >= 3 and result.finish_reason == "abort"
    _until(lambda: _running_on(demo_server.url) == 0)
    assert "Paris" in remote.generate(QUESTION, temperature=0, max_tokens=16).text


def test_a_remote_session_needs_no_vllm_in_its_process(engine, demo_server):
    code = textwrap.dedent(f"""
        import sys
        class NoVllm:  # as if vLLM were not installed
            def find_spec(self, name, path=None, target=None):
                if name == "vllm" or name.startswith("vllm."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, NoVllm())
        from IPython.core.error import UsageError
        from IPython.core.interactiveshell import InteractiveShell
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "vllm_magic")
        for magic in ("vllm_serve", "vllm_load"):  # they run vLLM here: one line says what to do
            try:
                ip.run_line_magic(magic, "")
                raise SystemExit(f"%{{magic}} ran without vLLM")
            except UsageError as error:
                assert "vLLM is not installed" in str(error) and "--remote" in str(error), error
        ip.run_line_magic("vllm_load", "--remote {demo_server.base_url}")  # the sampling panel shows too
        try:  # vLLM's parsers would run here: one line says so, the attached session stays
            ip.run_line_magic("vllm_load", "--remote {demo_server.base_url} --reasoning-parser qwen3")
            raise SystemExit("a reasoning parser was set without vLLM")
        except UsageError as error:
            assert "vLLM is not installed here" in str(error), error
        print(ip.run_cell_magic("vllm", "-t 0 -m 16 --quiet", {QUESTION!r}).text)
        print(ip.user_ns["llm"].invoke({QUESTION!r}, temperature=0, max_tokens=16))
        print(sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm.")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = engine.generate(QUESTION, temperature=0, max_tokens=16).text
    lines = out.stdout.strip().splitlines()
    assert lines[-3:] == [expected, expected, "[]"], out.stdout


# ----- errors ---------------------------------------------------------------------------------------

def test_remote_mistakes_are_one_line_and_keep_the_session(engine, demo_server, shell):
    ip, _ = shell
    register(ip, session=engine)
    closed = f"http://127.0.0.1:{_closed_port()}"
    cases = [
        (f"--remote {closed}", "connection refused"),
        (f"--remote {demo_server.url} --model no-such-model", "does not serve 'no-such-model'"),
        (f"--remote {demo_server.url} --max-model-len 512", "runs with the flags it was started with"),
        (f"--remote {demo_server.url}/nothing-here", "404"),
    ]
    for line, words in cases:
        with pytest.raises(UsageError, match=words) as error:
            ip.run_line_magic("vllm_load", line)
        assert "\n" not in str(error.value).strip()
        assert engine.config is not None and engine.config.platform != "remote"  # the engine is kept
    assert "Paris" in ip.run_cell_magic("vllm", "-t 0 -m 16 --quiet", QUESTION).text


def test_non_loopback_host_without_api_key_is_refused_before_anything_starts(shell):
    ip, _ = shell
    session = EngineSession()
    register(ip, session=session)
    with pytest.raises(UsageError, match="reachable from other machines.*--api-key"):
        ip.run_line_magic("vllm_serve", "--host 0.0.0.0 --port 0")
    assert session.server is None


def test_keyed_server_refuses_keyless_requests_and_stop_leaves_no_process(engine):
    owner = EngineSession()
    # Server-only flags pass through to vllm serve (it checks the parser's name while starting).
    server = owner.serve(port=0, api_key="s3cret",
                         server_kwargs={"enable_auto_tool_choice": True, "tool_call_parser": "hermes"})
    try:
        assert "--enable-auto-tool-choice" in server.argv
        assert server.argv[server.argv.index("--tool-call-parser") + 1] == "hermes"
        refused = httpx.post(f"{server.base_url}/completions", json={"model": server.model_name, "prompt": "Hi"})
        assert refused.status_code == 401
        with pytest.raises(ServerError, match="wants an API key"):
            EngineSession().connect(server.url)
        with pytest.raises(ServerError, match="refused the API key"):
            EngineSession().connect(server.url, api_key="wrong")
        keyed = EngineSession()
        keyed.connect(server.url, api_key="s3cret")
        assert keyed.generate(QUESTION, temperature=0, max_tokens=16).text == \
            engine.generate(QUESTION, temperature=0, max_tokens=16).text
        keyed.unload()
        pids = {p.pid for p in server.processes()}
        assert len(pids) >= 2  # the server and vLLM's engine core
    finally:
        owner.stop_server()
    assert not server.processes() and not _alive(pids)


def test_a_server_killed_mid_answer_ends_each_answer_with_a_clear_error(engine, demo_server):
    owner = EngineSession()
    server = owner.serve(port=0)
    session = EngineSession()
    session.connect(server.url)
    whole = session.submit(PROMPTS, temperature=0, max_tokens=4000, ignore_eos=True, stream=False)
    handle = session.submit("Write a very long story about a dragon.", temperature=0.8, max_tokens=4000,
                            ignore_eos=True)[0]
    assert handle.wait_for_delta(after=3, timeout=120)
    os.killpg(server.process.pid, signal.SIGKILL)
    with pytest.raises(ServerError, match="went away mid-answer"):
        handle.result(timeout=300)
    assert handle.snapshot().output_tokens >= 3  # what arrived is kept
    for batched in whole:  # a batch sent whole had nothing yet: each ends with the same one paragraph
        with pytest.raises(ServerError) as caught:
            batched.result(timeout=120)
        assert "\n" not in str(caught.value) and "went away" in str(caught.value)
    assert session.status().dead
    with pytest.raises(Exception, match="does not answer"):
        session.generate(QUESTION)
    owner.stop_server()
    session.connect(demo_server.url)  # the session takes another server
    assert "Paris" in session.generate(QUESTION, temperature=0, max_tokens=16).text
    session.unload()


def test_a_server_that_fails_to_start_reports_vllms_reason(tmp_path):
    owner = EngineSession()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ServerError, match="exited while starting") as error:
        owner.serve(str(tmp_path), port=0, timeout=600)
    assert "no-such-architecture" in str(error.value)  # vLLM's reason, not only that it failed
    assert owner.server is None


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _alive(pids: set[int]) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_managed_server_reports_its_processes_and_urls(demo_server):
    assert isinstance(demo_server, ManagedServer) and demo_server.alive
    assert demo_server.base_url == demo_server.url + "/v1"
    assert httpx.get(f"{demo_server.url}/health").status_code == 200
    assert demo_server.model_name == "SmolLM2-135M-Instruct"
    assert "openai" in demo_server.client_snippet() and demo_server.base_url in demo_server.client_snippet()
    assert len(demo_server.processes()) >= 2


# ----- batches nobody watches: one HTTP request, answers whole ----------------------------------------



def test_whole_batches_give_the_streamed_and_in_process_greedy_answers(engine, remote):
    near = [h.result(timeout=600) for h in engine.submit(PROMPTS, temperature=0, max_tokens=16)]
    streamed = [h.result(timeout=600) for h in remote.submit(PROMPTS, temperature=0, max_tokens=16)]
    whole = [h.result(timeout=600) for h in remote.submit(PROMPTS, temperature=0, max_tokens=16, stream=False)]
    assert [r.token_ids for r in whole] == [r.token_ids for r in streamed] == [r.token_ids for r in near]
    assert [r.text for r in whole] == [r.text for r in near]
    assert [r.prompt_token_ids for r in whole] == [r.prompt_token_ids for r in near]
    assert [r.prompt for r in whole] == [r.prompt for r in near]  # the server's rendering, fetched when read
    sampled = [h.result(timeout=600) for h in remote.submit(PROMPTS[:2], temperature=1.0, seed=3, n=2, max_tokens=8,
                                                             stream=False)]
    assert [len(r.completions) for r in sampled] == [2, 2]
    assert all(c.token_ids and c.finish_reason for r in sampled for c in r.completions)


def test_aborting_one_request_of_a_whole_batch_keeps_the_others(remote):
    handles = remote.submit(PROMPTS[:4], temperature=0, max_tokens=48, ignore_eos=True, stream=False)
    handles[1].abort()
    results = [h.result(timeout=600) for h in handles]
    assert [r.aborted for r in results] == [False, True, False, False]
    assert [r.output_tokens for i, r in enumerate(results) if i != 1] == [48, 48, 48]
    assert results[1].output_tokens == 0
    assert remote.status().requests_live == 0


def test_aborting_a_whole_batch_stops_it_on_the_server(remote, demo_server):
    handles = remote.submit(PROMPTS, temperature=0, max_tokens=4000, ignore_eos=True, stream=False)
    assert remote.abort_all() == len(PROMPTS)
    assert all(h.result(timeout=60).aborted for h in handles)
    _until(lambda: _running_on(demo_server.url) == 0, timeout=120)
    assert "Paris" in remote.generate(QUESTION, temperature=0, max_tokens=16).text


def test_a_thousand_concurrent_remote_requests_from_threads_and_asyncio_each_get_their_own_answer(engine, remote):
    import asyncio
    import threading

    from vllm_magic.langchain import VLLM

    prompts = [f"Item {i}: the number {i} in words is" for i in range(1000)]
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def batch(indices: list[int], stream: bool) -> None:
        try:
            handles = remote.submit([prompts[i] for i in indices], raw=True, temperature=0, max_tokens=3,
                                    ignore_eos=True, stream=stream)
            for i, handle in zip(indices, handles):
                results[i] = handle.result(timeout=1200)
        except BaseException as exc:  # reported below, with the others'
            errors.append(exc)

    async def one_by_one(indices: list[int]) -> None:
        handles = [remote.submit(prompts[i], raw=True, temperature=0, max_tokens=3, ignore_eos=True)[0]
                   for i in indices]
        for i, result in zip(indices, await asyncio.gather(*handles)):
            results[i] = result

    threads = [threading.Thread(target=batch, args=(list(range(k, 500, 10)), k % 2 == 0)) for k in range(10)]
    for thread in threads:
        thread.start()
    asyncio.run(one_by_one(list(range(500, 1000))))
    for thread in threads:
        thread.join(timeout=1200)
    assert not errors and len(results) == 1000
    for i, result in results.items():  # each its own: its own prompt, a complete answer
        assert result.prompt == prompts[i] and not result.aborted and result.error is None
        assert result.output_tokens == 3 and result.finish_reason == "length"
    assert len({r.request_id for r in results.values()}) == 1000
    llm = VLLM.from_session(remote)  # spot checks against the in-process engine's greedy answers
    for i in (0, 499, 500, 999):
        near = engine.generate(prompts[i], raw=True, temperature=0, max_tokens=3, ignore_eos=True)
        assert results[i].token_ids == near.token_ids
        assert llm.invoke(prompts[i], raw=True, temperature=0, max_tokens=3, ignore_eos=True) == near.text


def test_a_remote_cell_streams_its_answer_as_it_grows(demo_server, shell):
    ip, publisher = shell
    session = EngineSession()
    register(ip, session=session)
    ip.run_line_magic("vllm_load", f"--remote {demo_server.url} --no-controls")
    publisher.clear()
    result = ip.run_cell_magic("vllm", "-t 0 -m 64", "Write a long story about a dragon.")
    updates = [c for c in publisher.calls if c["update"]]
    assert result.generation.output_tokens > 20
    assert len(updates) > 1  # the answer was redrawn while it grew, not drawn once at the end
    session.unload()


def test_prompts_rendered_here_match_the_servers_rendering_and_fall_back_without_its_files(remote, demo_server):
    prompts = ["Name a color.", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                 {"role": "user", "content": "Name a fruit."}]]
    here = remote.submit(prompts, system="Be brief.", temperature=0, max_tokens=8, stream=False)
    far = EngineSession()
    far.connect(demo_server.url)
    far.backend.root = "/nonexistent/model/dir"  # as for a server whose model files this machine lacks
    there = far.submit(prompts, system="Be brief.", temperature=0, max_tokens=8, stream=False)
    near, away = [h.result(timeout=600) for h in here], [h.result(timeout=600) for h in there]
    assert [r.prompt_token_ids for r in near] == [r.prompt_token_ids for r in away]
    assert [r.token_ids for r in near] == [r.token_ids for r in away] and all(r.output_tokens for r in near)
    assert [r.prompt for r in near] == [r.prompt for r in away]
    assert remote.backend._local_renderer() is not None and far.backend._local_renderer() is None
    far.unload()


def test_logprobs_grids_branches_and_the_prefix_cache_work_over_a_remote_session(engine, remote):
    from vllm_magic.engine.requests.prompts import TokenPrompt
    from vllm_magic.langchain import ChatVLLM
    from vllm_magic.magics.results import VllmResult
    from vllm_magic.widgets.explorer import TokenExplorer

    near = engine.generate(QUESTION, temperature=0, max_tokens=16, logprobs=3)
    handle = remote.submit(QUESTION, temperature=0, max_tokens=16, logprobs=3)[0]
    far = handle.result(timeout=600)
    assert far.token_ids == near.token_ids
    for a, b in zip(far.logprobs, near.logprobs):
        assert (a.token_id, a.text, a.rank) == (b.token_id, b.text, b.rank) == (b.token_id, b.text, 1)
        assert a.logprob == pytest.approx(b.logprob, abs=1e-2)  # GPUs batch differently: ~1e-3 seen
        assert [c.token_id for c in a.top] == [c.token_id for c in b.top] and [c.rank for c in a.top] == [1, 2, 3]
    # Prompt logprobs (sent whole: vLLM streams none) of the answer sent back as token ids.
    back = remote.generate(TokenPrompt(far.prompt_token_ids + far.token_ids), temperature=0, max_tokens=1,
                           prompt_logprobs=1)
    scored = back.prompt_logprobs[len(far.prompt_token_ids):]
    assert [p.token_id for p in scored] == far.token_ids
    assert [p.logprob for p in scored] == pytest.approx([p.logprob for p in far.logprobs], abs=1e-2)
    # The server's usage says what its prefix cache served (%vllm_serve starts it with prompt token details).
    passage = "The river Seine flows through Paris and on to the sea at Le Havre. " * 12 + "Which city?"
    remote.generate(passage, temperature=0, max_tokens=2)
    again = remote.generate(passage, temperature=0, max_tokens=2)
    assert again.cached_tokens and again.cached_tokens >= again.prompt_tokens // 2
    # A grid: one submission, its answers those of the in-process engine at temperature 0.
    submissions = remote.submissions
    grid = remote.grid([QUESTION, "Name a colour."], {"temperature": [0, 1.0], "max_tokens": [4, 8]}, seed=1)
    results = grid.results()
    assert remote.submissions == submissions + 1 and len(grid) == 8
    assert results[1][0].token_ids == near.token_ids[:8] and results[1][0].logprobs is not None
    # A branch from the explorer continues from the chosen token on the server.
    explorer = TokenExplorer(VllmResult(far, QUESTION, handle.sampling_params), remote)
    alternative = far.logprobs[1].alternatives()[0]
    branch = explorer.branch(1, alternative)
    assert branch.token_ids[:2] == [far.token_ids[0], alternative.token_id] and len(branch.token_ids) > 2
    explorer.close()
    chat = ChatVLLM.from_session(remote, temperature=0, max_tokens=8, logprobs=True, top_logprobs=2)
    message = chat.invoke(QUESTION)
    assert "".join(c["token"] for c in message.response_metadata["logprobs"]["content"]) == message.content


# ----- embeddings from a server -------------------------------------------------------------------------

def test_an_embedding_server_gives_the_in_process_vectors_and_a_generation_server_refuses(engine, demo_server):
    from vllm_magic.engine.embeddings import cosine
    from vllm_magic.langchain import VLLMEmbeddings

    texts = ["Leonardo da Vinci painted the Mona Lisa.", "Bread is made from flour, water, yeast and salt.",
             "word " * 2000]  # longer than the context: truncated there as here
    owner = EngineSession()
    # `vllm serve MODEL --runner pooling --convert embed --max-model-len 512` (a short context: quick on a CPU)
    server = owner.serve(port=0, runner="pooling", convert="embed", max_model_len=512)
    remote = EngineSession()
    try:
        with pytest.raises(ServerError) as refused:  # a text generation server serves no embeddings
            remote.load_embedder(url=demo_server.url)
        message = str(refused.value)
        assert "serves no embeddings" in message and "HTTP 404" in message and "\n" not in message
        assert remote.embedder is None
        info = remote.load_embedder(url=server.base_url)
        assert not info.already_loaded and f"on the vLLM server at {server.url}" in info.summary
        assert remote.load_embedder(url=server.url).already_loaded
        assert "576 dimensions" in remote.status()._repr_markdown_()
        engine.load_embedder(max_model_len=512)  # the same configuration in this kernel
        there, here = remote.embed(texts), engine.embed(texts)
        assert len(there) == 3 and all(len(v) == 576 for v in there)
        assert all(cosine(x, y) > 0.99999 for x, y in zip(there, here))  # the same vectors, up to float noise
        question = "Who painted the Mona Lisa?"
        assert remote.score(question, texts[:2]) == pytest.approx(engine.score(question, texts[:2]), abs=1e-4)
        live = remote.embedder
        embeddings = VLLMEmbeddings(base_url=server.base_url, session=remote)  # attaches: no new connection
        assert remote.embedder is live
        assert cosine(embeddings.embed_query(texts[0]), here[0]) > 0.99999
        assert remote.unload_embedder() and server.alive  # letting go of a server leaves it running
    finally:
        engine.unload_embedder()
        remote.unload()
        owner.stop_server()
    assert not server.processes()
