"""The embedding engine beside the shared demo engine: vectors, scores, truncation, mistakes, switching
and unloading, the magics and ``VLLMEmbeddings``.

One embedder of the demo model (vLLM's pooling runner, ``convert="embed"``) is loaded for the module
beside the suite's generation engine, with a 512-token context so that truncation is cheap to show on
a CPU; a test that switches or unloads it leaves the next test to load it again.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path

import pytest
from IPython.core.error import UsageError

import demo_engine
from child_processes import engine_children
from polling import until
from vllm_magic.engine.embeddings import cosine
from vllm_magic.engine.gpu_memory import DoesNotFit, cards
from vllm_magic.engine.session import EngineSession
from vllm_magic.errors import ConfigError, NoEmbedderError, RequestError
from vllm_magic.langchain import VLLMEmbeddings

# Over the suite's 15 min default: the tests that switch or unload the embedder start engines again.
pytestmark = pytest.mark.timeout(1800)

EMBED_ARGS = {"max_model_len": 512}
TEXTS = ["Paris is the capital and largest city of France.", "Dogs bark to warn their owners.",
         "Water boils at 100 degrees Celsius at sea level."]
#: A question, a document that answers it, and one about something else.
TRIPLES = [
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa.",
     "Bread is made from flour, water, yeast and salt."),
    ("How do plants make food?", "Photosynthesis turns sunlight, water and carbon dioxide into sugar in plants.",
     "The stock market closed higher on Tuesday after strong earnings."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote the play Romeo and Juliet.",
     "Mount Everest is the highest mountain on Earth."),
]
QUESTION = "What is the capital of France?"
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def _module_embedder(engine):
    engine.load_embedder(**EMBED_ARGS)
    yield
    engine.unload_embedder()


@pytest.fixture
def embedder(engine, _module_embedder):
    """The shared session with the module's embedder beside the demo engine (loaded again after a
    test that switched or unloaded it; at once when it is there)."""
    engine.load_embedder(**EMBED_ARGS)
    return engine


def _close(a, b) -> bool:
    """The same vectors (or lists of them) up to float noise: a batch computes in another order, and a
    GPU differs by up to ~3e-4 per number between a text alone and in a batch (cosine 0.999999)."""
    if a and isinstance(a[0], list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return len(a) == len(b) and cosine(a, b) > 0.99999


def _hidden_size(session: EngineSession) -> int:
    return json.loads((Path(session.embedder.config.model) / "config.json").read_text())["hidden_size"]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and len(text) < 400, text
    return text


def _answers(session: EngineSession) -> str:
    return session.generate(QUESTION, temperature=0, max_tokens=16).text


# ----- vectors and scores ---------------------------------------------------------------------------

def test_vectors_have_the_hidden_size_keep_their_order_and_repeat(embedder):
    first = embedder.embed(TEXTS)
    assert len(first) == len(TEXTS) and {len(v) for v in first} == {_hidden_size(embedder)} == {576}
    assert embedder.embedder.dimension == 576
    assert all(type(x) is float for vector in first for x in vector)  # plain floats, not numpy or torch
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, abs_tol=1e-4) for v in first)  # normalized
    assert _close(embedder.embed(TEXTS), first)  # deterministic
    assert _close(embedder.embed(TEXTS[::-1])[::-1], first)  # each vector belongs to its text
    one = embedder.embed(TEXTS[1])  # a single string: a list of one vector
    assert len(one) == 1 and _close(one[0], first[1])
    assert embedder.embed([]) == []
    assert len({tuple(round(x, 4) for x in v) for v in first}) == len(TEXTS)  # different texts, different vectors


def test_a_relevant_document_ranks_above_an_unrelated_one(embedder):
    for question, relevant, unrelated in TRIPLES:
        q, r, u = embedder.embed([question, relevant, unrelated])
        assert cosine(q, r) > cosine(q, u) + 0.05, (question, cosine(q, r), cosine(q, u))
    # and across the board: each question's own answer is the closest of the three answers
    questions = embedder.embed([t[0] for t in TRIPLES])
    answers = embedder.embed([t[1] for t in TRIPLES])
    for i, q in enumerate(questions):
        similarities = [cosine(q, a) for a in answers]
        assert max(range(len(answers)), key=similarities.__getitem__) == i, (TRIPLES[i][0], similarities)


def test_score_is_the_cosine_of_the_embeddings(embedder):
    for question, relevant, unrelated in TRIPLES:
        scores = embedder.score(question, [relevant, unrelated])
        q, r, u = embedder.embed([question, relevant, unrelated])
        assert scores == pytest.approx([cosine(q, r), cosine(q, u)], abs=1e-4)
        assert scores[0] > scores[1]
    assert embedder.score(QUESTION, []) == []
    assert len(embedder.score(QUESTION, TEXTS[0])) == 1  # one document as a string


def test_texts_longer_than_the_context_are_truncated_to_it_not_refused(embedder):
    context = embedder.embedder.max_model_len
    assert context == 512
    long, longer, short = embedder.embed(["word " * (2 * context), "word " * (4 * context), "word " * (context // 4)])
    assert _close(long, longer)  # both cut to the same first 512 tokens
    assert cosine(long, short) < 0.99
    assert len(embedder.score("word " * (3 * context), ["word " * (2 * context)])) == 1


# ----- mistakes ---------------------------------------------------------------------------------------

def test_mistakes_are_one_line_and_every_engine_keeps_working(embedder, tmp_path):
    live = embedder.embedder
    empty = EngineSession()
    with pytest.raises(NoEmbedderError) as none:
        empty.embed(QUESTION)
    assert "%vllm_load --embed" in _one_line(none) and "load_embedder" in _one_line(none)
    with pytest.raises(NoEmbedderError):
        empty.score(QUESTION, TEXTS)
    bogus = tmp_path / "not-a-model"
    bogus.mkdir()
    (bogus / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(ConfigError) as unknown:  # a model vLLM cannot pool: refused before anything starts
        embedder.load_embedder(str(bogus))
    assert "NoSuchModelForCausalLM" in _one_line(unknown)
    with pytest.raises(ConfigError) as classifier:  # pooled, but into classes, not embeddings
        embedder.load_embedder(convert="classify")
    assert "not embeddings" in _one_line(classifier)
    with pytest.raises(ConfigError) as generator:
        embedder.load_embedder(runner="generate")
    assert "pooling runner" in _one_line(generator)
    with pytest.raises(RequestError) as blank:  # vLLM embeds at least one token
        embedder.embed(["", TEXTS[0]])
    assert "empty" in _one_line(blank)
    with pytest.raises(RequestError) as numbers:
        embedder.embed([TEXTS[0], 42])
    assert "strings" in _one_line(numbers)
    assert embedder.embedder is live  # none of them touched either engine
    assert len(embedder.embed(TEXTS[0])[0]) == 576
    assert "Paris" in _answers(embedder)


def _waiting_on_the_engine(thread: threading.Thread) -> bool:
    """Whether ``thread`` waits in the engine driver's ``call`` (for the driver thread to run it)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == "call" and frame.f_code.co_filename.endswith("driver.py"):
            return True
        frame = frame.f_back
    return False


def test_an_interrupt_while_embedding_leaves_the_engine_serving(embedder, kernel_sigint):
    expected = embedder.embed(TEXTS)
    busy, release = threading.Event(), threading.Event()

    def hold_the_engine(llm):  # the driver thread waits here: the embedding below waits for it
        busy.set()
        return release.wait(timeout=120)

    def interrupt() -> None:  # Ctrl-C (the kernel's interrupt: SIGINT) while the main thread waits
        until(lambda: _waiting_on_the_engine(threading.main_thread()), timeout=120, what="the embedding's wait")
        os.kill(os.getpid(), signal.SIGINT)

    holder = threading.Thread(target=lambda: embedder.run_on_embedder(hold_the_engine))
    holder.start()
    assert busy.wait(timeout=60)
    interrupter = threading.Thread(target=interrupt)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            embedder.embed(TEXTS)
    finally:
        release.set()
        interrupter.join(timeout=60)
        holder.join(timeout=60)
    assert not interrupter.is_alive() and not holder.is_alive()
    assert embedder.embedder.death() is None
    assert _close(embedder.embed(TEXTS), expected)  # the engine finished the dropped call and serves on


# ----- the magics ---------------------------------------------------------------------------------------

def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_magics_load_show_and_refuse_the_embedder_in_one_line(embedder, ip, capsys):
    live = embedder.embedder
    ip.run_line_magic("vllm_load", "--embed --max-model-len 512")
    platform = embedder.embedder.config.platform
    assert f"SmolLM2-135M-Instruct already loaded for embeddings ({platform}, float32, max_model_len=512)" in \
        capsys.readouterr().out
    status = ip.run_line_magic("vllm_status", "")._repr_markdown_()
    line = status.split("Embedding engine", 1)[1]
    assert "SmolLM2-135M-Instruct" in line and "576 dimensions" in line and "context 512 tokens" in line
    assert re.search(r"memory \d+\.\d\d GiB", line)
    for bad, words in (("--embed --keep", "does not go with --embed"),
                       ("--embed --max-modle-len 5", "unrecognized engine arguments"),
                       ("--embed --reasoning-parser qwen3", "parsers read generated text"),
                       (f"--embed --remote http://127.0.0.1:{_closed_port()}", "could not reach")):
        with pytest.raises(UsageError) as refused:
            ip.run_line_magic("vllm_load", bad)
        assert words in _one_line(refused), bad
    with pytest.raises(UsageError, match="does not go with --embed"):
        ip.run_line_magic("vllm_unload", "--embed --stop")
    assert embedder.embedder is live and embedder.loaded


def test_the_readme_embedding_cells_run_as_written(embedder, ip, capsys):
    text = README.read_text()
    start = text.index("<!-- section: embeddings -->")
    section = text[start:text.index("<!-- section:", start + 1)]
    cells = re.findall(r"```ipython\n(.*?)```", section, flags=re.S)
    assert cells
    for cell in cells:
        result = ip.run_cell(cell)
        assert result.success, f"README cell failed:\n{cell}\n{result.error_in_exec or result.error_before_exec}"
    out = capsys.readouterr().out
    assert "already loaded for embeddings" in out and "unloaded the embedding engine" in out
    assert embedder.embedder is None and embedder.loaded  # the generation engine stays


# ----- LangChain ----------------------------------------------------------------------------------------

async def test_vllm_embeddings_attach_to_the_live_embedder_without_a_second_engine(embedder):
    live, pids = embedder.embedder, engine_children()
    first = VLLMEmbeddings(vllm_kwargs=EMBED_ARGS)
    again = VLLMEmbeddings(model="SmolLM2-135M-Instruct")  # no arguments: the live embedder serves it
    assert embedder.embedder is live and engine_children() == pids
    assert _close(first.embed_query(TEXTS[0]), embedder.embed(TEXTS[0])[0])
    assert _close(again.embed_documents(TEXTS), embedder.embed(TEXTS))
    assert _close(await again.aembed_documents(TEXTS), embedder.embed(TEXTS))
    assert _close(await again.aembed_query(TEXTS[2]), embedder.embed(TEXTS[2])[0])
    assert embedder.embedder is live and engine_children() == pids


async def test_async_embeddings_leave_the_event_loop_free(embedder):
    model = VLLMEmbeddings(vllm_kwargs=EMBED_ARGS)
    busy, release = threading.Event(), threading.Event()

    def hold_the_engine(llm):  # the engine's driver thread waits here until the loop releases it
        busy.set()
        return release.wait(timeout=120)

    holder = threading.Thread(target=lambda: embedder.run_on_embedder(hold_the_engine))
    holder.start()
    assert busy.wait(timeout=60)
    task = asyncio.ensure_future(model.aembed_documents(TEXTS))
    for _ in range(5):
        await asyncio.sleep(0)  # the loop runs on while the texts wait for the engine
    assert not task.done()
    release.set()
    vectors = await asyncio.wait_for(task, timeout=120)
    holder.join(timeout=60)
    assert not holder.is_alive() and _close(vectors, embedder.embed(TEXTS))


# ----- switching and unloading ----------------------------------------------------------------------------

def test_switching_and_unloading_the_embedder_leave_none_of_its_processes(embedder, ip, capsys):
    generation = set(embedder.backend.children)
    first = set(embedder.embedder.backend.children)
    assert first and generation and not first & generation
    info = embedder.load_embedder(max_model_len=256)  # another configuration replaces it
    assert not info.already_loaded and embedder.embedder.max_model_len == 256
    assert not first & engine_children(), "processes of the first embedder survived the switch"
    assert embedder.last_embedder_unload.processes_killed == 0
    assert embedder.last_embedder_unload.device_memory_returned in (None, True)  # None: not a GPU
    second = set(embedder.embedder.backend.children)
    assert len(embedder.embed(TEXTS[0])[0]) == 576
    ip.run_line_magic("vllm_unload", "--embed")
    assert "unloaded the embedding engine of SmolLM2-135M-Instruct" in capsys.readouterr().out
    assert embedder.embedder is None and not second & engine_children()
    assert generation <= engine_children() and "Paris" in _answers(embedder)  # the generation engine went on
    with pytest.raises(NoEmbedderError):
        embedder.embed(TEXTS[0])
    ip.run_line_magic("vllm_unload", "--embed")
    assert "no embedding model is loaded" in capsys.readouterr().out


def test_unloading_the_session_frees_both_engines(embedder, ip, capsys):
    pids = set(embedder.backend.children) | set(embedder.embedder.backend.children)
    try:
        ip.run_line_magic("vllm_unload", "")
        out = capsys.readouterr().out
        assert "unloaded SmolLM2-135M-Instruct" in out and "unloaded the embedding engine" in out
        assert not embedder.loaded and embedder.embedder is None
        assert not pids & engine_children(), "engine processes survived the unload"
        assert embedder.last_unload.device_memory_returned in (None, True)  # None: not a GPU
        assert embedder.last_embedder_unload.device_memory_returned in (None, True)
    finally:
        demo_engine.restore(embedder)
    assert "Paris" in _answers(embedder)


# ----- a shared GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_on_a_gpu_the_embedder_is_sized_beside_the_generation_engine_and_one_that_cannot_fit_is_one_line(embedder):
    live = embedder.embedder
    plan = live.backend.memory_plan  # sized for what the generation engine left free, as every engine here
    assert plan is not None and plan.kv_cache_bytes >= plan.per_token_bytes * 512
    assert live.memory()[0] > 0 and "GPU memory" in live.memory()[1]
    # The generation engine replaced while the embedder runs: its unload waits for its own memory only.
    try:
        embedder.load(max_model_len=2048)
        assert embedder.last_unload.device_memory_returned is True
        assert embedder.embedder is live and len(embedder.embed(TEXTS[0])[0]) == 576
    finally:
        demo_engine.restore(embedder)
    # An embedder that cannot fit beside it: refused in one line before anything starts (restoring the
    # generation engine above unloaded both engines, as session.unload() does).
    assert embedder.embedder is None and embedder.last_embedder_unload.device_memory_returned is True
    pids = engine_children()
    with pytest.raises(DoesNotFit) as refused:
        # a KV cache as large as the memory free now: the card would hold it alone, not beside the engine
        embedder.load_embedder(max_model_len=512, kv_cache_memory_bytes=cards()[0].free - (1 << 30))
    assert "does not fit on GPU" in str(refused.value) and "\n" not in str(refused.value)  # who holds it, what to pass
    assert embedder.embedder is None and engine_children() <= pids  # nothing was started
    assert "Paris" in _answers(embedder)  # the generation engine serves on


def test_templates_put_documents_and_queries_to_the_model_and_the_store_keeps_the_text(embedder):
    from langchain_core.vectorstores import InMemoryVectorStore

    eol = VLLMEmbeddings(vllm_kwargs=EMBED_ARGS, document_template='This sentence : "{text}" means in one word:"',
                         query_template='This sentence : "{text}" means in one word:"')
    plain = VLLMEmbeddings(vllm_kwargs=EMBED_ARGS)
    assert _close(eol.embed_query("the sea"), embedder.embed(['This sentence : "the sea" means in one word:"'])[0])
    assert not _close(eol.embed_query("the sea"), plain.embed_query("the sea"))
    assert _close(eol.embed_documents(["a", "b"]), embedder.embed(['This sentence : "a" means in one word:"',
                                                                    'This sentence : "b" means in one word:"']))
    store = InMemoryVectorStore.from_texts(["The ship sails at dawn.", "Bread rises in the oven."], eol)
    assert store.similarity_search("the ship", k=1)[0].page_content == "The ship sails at dawn."
    with pytest.raises(RequestError, match=r"query_template holds \{text\}"):
        VLLMEmbeddings(vllm_kwargs=EMBED_ARGS, query_template="query:")
