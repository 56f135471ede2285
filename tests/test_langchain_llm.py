"""``VLLM``: LangChain's LLM interface over the session's live engine (real demo-model engine)."""

from __future__ import annotations

import asyncio
import threading
import warnings

import pytest
from vllm_magic.errors import NoEngineError, PromptTooLongError, RequestError
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.prompts import PromptTemplate

import vllm_magic.langchain as lc
from vllm_magic.demo.model import DEMO_MODEL_NAME
from vllm_magic.langchain import VLLM
from vllm_magic.engine.session import EngineSession

FRANCE = "What is the capital of France?"


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


def test_public_names():
    assert lc.__all__ == ["VLLM", "ChatVLLM", "VLLMEmbeddings"]


# ----- the seed tutorial, with only the import changed ---------------------------------------------

def test_seed_constructor_and_invoke(engine):
    created = engine.engines_created
    llm = VLLM(model=DEMO_MODEL_NAME, trust_remote_code=True, max_new_tokens=128, top_k=10, top_p=0.95,
               temperature=0.8)
    answer = llm.invoke("What is the capital of France ?")
    assert isinstance(answer, str) and answer.strip()
    assert engine.engines_created == created  # attached: trust_remote_code does not make another engine
    assert llm._wanted.fingerprint == engine.config.fingerprint  # loaded first, it is the engine %vllm_load makes
    assert llm._default_params == {"max_tokens": 128, "top_k": 10, "top_p": 0.95, "temperature": 0.8}


def test_seed_step_by_step_chain(engine):
    llm = VLLM(model=DEMO_MODEL_NAME, max_new_tokens=48, temperature=0)
    template = """Question: {question}

Answer: Let's think step by step."""
    prompt = PromptTemplate.from_template(template)
    chain = prompt | llm
    question = "Who was the US president in the year the first Pokemon game was released?"
    answer = chain.invoke({"question": question})
    assert answer.strip()
    assert answer == llm.invoke(template.format(question=question))  # greedy: the chain sends that text


def test_seed_vllm_kwargs_of_the_live_engine_attach(engine):
    created = engine.engines_created
    status = engine.status()
    llm = VLLM(model=DEMO_MODEL_NAME, trust_remote_code=True, max_new_tokens=16, temperature=0,
               vllm_kwargs={"max_model_len": status.max_model_len, "dtype": status.dtype})
    assert "Paris" in llm.invoke(FRANCE)
    assert engine.engines_created == created


def test_ten_constructions_make_one_engine(engine):
    created = engine.engines_created
    llms = [VLLM(model=DEMO_MODEL_NAME, trust_remote_code=True, max_new_tokens=8, temperature=0)
            for _ in range(10)]
    assert engine.engines_created == created
    assert engine.loaded and all(llm.engine_session is engine for llm in llms)
    assert "Paris" in llms[-1].invoke(FRANCE, max_new_tokens=16)


# ----- batch, stream, async ---------------------------------------------------------------------

def test_batch_of_64_prompts_is_one_submission(engine):
    llm = VLLM(temperature=0, max_new_tokens=8)
    prompts = [f"Write the number {i} in words." for i in range(64)]
    submissions, served = engine.submissions, engine.requests_served
    answers = llm.batch(prompts)
    assert engine.submissions == submissions + 1
    assert engine.requests_served == served + 64
    assert len(answers) == 64 and all(a.strip() for a in answers)
    assert len(set(answers)) > 32  # different prompts, different answers: no mix-up of requests


async def test_abatch_is_one_submission(engine):
    llm = VLLM(temperature=0, max_new_tokens=8)
    submissions = engine.submissions
    prompts = [FRANCE, "Write the number 7 in words."]
    answers = await llm.abatch(prompts)
    assert engine.submissions == submissions + 1
    assert "Paris" in answers[0]
    assert answers == [await llm.ainvoke(p) for p in prompts]


def test_stream_yields_deltas_that_join_to_invoke(engine):
    llm = VLLM(temperature=0, max_new_tokens=64)
    prompt = "Tell me about Paris."
    recorder = TokenRecorder()
    chunks = list(llm.stream(prompt, config={"callbacks": [recorder]}))
    assert len(chunks) > 1
    assert recorder.tokens == chunks  # on_llm_new_token before each yield
    assert "".join(chunks) == llm.invoke(prompt)
    assert engine.last_result.output_tokens == 64


def test_stream_first_chunk_arrives_while_the_request_still_runs(engine):
    # 4000 tokens, ignoring EOS: the request cannot end by itself between the first chunk and the
    # close below, so an aborted result proves the chunk came while it ran (no timing involved).
    finished, ended = [], threading.Event()

    def record(result):
        finished.append(result)
        ended.set()

    engine.add_listener(record)
    try:
        served = engine.requests_served
        stream = VLLM(temperature=0, max_new_tokens=4000, ignore_eos=True).stream("Tell me about Paris.")
        first = next(stream)
        assert first  # real text, not a placeholder
        assert engine.requests_served == served  # not held back until the request finished
        stream.close()
        assert ended.wait(120), "the request did not end"
    finally:
        engine.remove_listener(record)
    assert finished[0].aborted and 0 < finished[0].output_tokens < 4000


def test_stream_final_chunk_carries_generation_info(engine):
    llm = VLLM(temperature=0, max_new_tokens=16, ignore_eos=True)
    chunks = list(llm._stream("Tell me about Paris."))
    assert all(c.generation_info is None for c in chunks[:-1])
    assert chunks[-1].text == ""
    assert chunks[-1].generation_info["finish_reason"] == "length"
    assert chunks[-1].generation_info["completion_tokens"] == 16


async def test_astream_yields_deltas_that_join_to_ainvoke(engine):
    llm = VLLM(temperature=0, max_new_tokens=32)
    chunks = [c async for c in llm.astream("Tell me about Rome.")]
    assert len(chunks) > 1
    assert "".join(chunks) == await llm.ainvoke("Tell me about Rome.")


def test_stream_consumer_that_stops_early_aborts_the_request(engine):
    finished = []
    ended = threading.Event()

    def record(result):
        finished.append(result)
        ended.set()

    engine.add_listener(record)
    try:
        stream = VLLM(temperature=0, max_new_tokens=200, ignore_eos=True).stream("Tell me about Paris.")
        next(stream)
        stream.close()
        assert ended.wait(60), "the request did not end"
    finally:
        engine.remove_listener(record)
    assert finished[0].aborted and finished[0].output_tokens < 200


async def test_50_concurrent_ainvoke_return_their_own_answers(engine, monkeypatch):
    from vllm_magic.engine.requests.handles import RequestHandle

    llm = VLLM(temperature=0, max_new_tokens=12)
    prompts = [f"Write the number {i} in words." for i in range(50)]
    alone = {i: llm.invoke(prompts[i]) for i in range(0, 50, 5)}  # asking each alone is slow on a CPU
    # Awaited on the event loop, not one blocked thread per call: every submission comes from the
    # loop's thread and nothing waits on a handle the blocking way (no thread count sampled).
    submitted_from, blocking_waits = [], []
    submit, wait_for = engine.submit, RequestHandle._wait_for
    monkeypatch.setattr(engine, "submit", lambda *a, **kw: (submitted_from.append(threading.get_ident()),
                                                            submit(*a, **kw))[1])
    monkeypatch.setattr(RequestHandle, "_wait_for", lambda self, *a, **kw: (blocking_waits.append(self.request_id),
                                                                            wait_for(self, *a, **kw))[1])
    served = engine.requests_served
    answers = await asyncio.wait_for(asyncio.gather(*(llm.ainvoke(p) for p in prompts)), timeout=600)
    assert engine.requests_served == served + 50
    assert {i: answers[i] for i in alone} == alone
    assert len(set(answers)) > 25  # each call got an answer to its own prompt, not a neighbour's
    assert submitted_from == [threading.get_ident()] * 50 and blocking_waits == []


# ----- sampling, stop, metadata ---------------------------------------------------------------------

def test_unset_fields_follow_session_defaults_and_set_fields_win(engine):
    engine.defaults.max_tokens = 3
    engine.defaults.temperature = 0
    follows = VLLM().generate([FRANCE])
    assert follows.generations[0][0].generation_info["completion_tokens"] == 3
    own = VLLM(max_new_tokens=5).generate([FRANCE])
    assert own.generations[0][0].generation_info["completion_tokens"] == 5
    assert own.generations[0][0].generation_info["finish_reason"] == "length"


def test_stop_at_construction_and_call_time_call_wins(engine):
    llm = VLLM(temperature=0, max_new_tokens=16, stop=["Paris"])
    assert llm.invoke(FRANCE).rstrip() == "The capital of France is"
    replaced = llm.invoke(FRANCE, stop=["France"])
    assert replaced.rstrip() == "The capital of"
    other = VLLM(temperature=0, max_new_tokens=16, stop=["capital"])
    assert "capital" not in other.invoke(FRANCE)
    assert "capital" in other.invoke(FRANCE, stop=["Paris"])  # the construction stop no longer applies


def test_generation_info_and_identifying_params(engine):
    llm = VLLM(temperature=0, max_new_tokens=16)
    result = llm.generate([FRANCE, "Hi"])
    info = result.generations[0][0].generation_info
    assert info["finish_reason"] == "stop"
    assert info["prompt_tokens"] > 5 and info["completion_tokens"] > 0
    usage = result.llm_output["token_usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > info["prompt_tokens"]  # both prompts counted
    assert llm._identifying_params == {"model_name": DEMO_MODEL_NAME, "temperature": 0.0, "max_tokens": 16}
    assert llm._llm_type == "vllm"


def test_n_gives_n_answers_per_prompt(engine):
    result = VLLM(n=3, temperature=1.0, seed=1, max_new_tokens=8).generate([FRANCE])
    assert len(result.generations[0]) == 3


def test_prompts_go_through_the_chat_template_unless_raw(engine):
    VLLM(temperature=0, max_new_tokens=4).invoke(FRANCE)
    assert "<|im_start|>user" in engine.last_result.prompt
    VLLM(temperature=0, max_new_tokens=4, raw=True).invoke(FRANCE)
    assert engine.last_result.prompt == FRANCE


def test_raw_left_unset_follows_the_session_mode(engine):
    llm = VLLM(temperature=0, max_new_tokens=4)
    engine.defaults.raw = True  # what the sampling panel's chat/raw toggle sets
    llm.invoke(FRANCE)
    assert engine.last_result.prompt == FRANCE
    VLLM(temperature=0, max_new_tokens=4, raw=False).invoke(FRANCE)  # set on the object: it wins
    assert "<|im_start|>user" in engine.last_result.prompt
    engine.defaults.raw = False
    llm.invoke(FRANCE)
    assert "<|im_start|>user" in engine.last_result.prompt


def test_choice_given_per_call_constrains_the_answer(engine):
    answer = VLLM(temperature=0, max_new_tokens=4).invoke("Is Paris in France?", choice=["yes", "no"])
    assert answer in ("yes", "no")


def test_from_session_follows_the_live_engine(engine):
    created = engine.engines_created
    llm = VLLM.from_session(temperature=0, max_new_tokens=16)
    assert llm.model_name == DEMO_MODEL_NAME and llm.model == DEMO_MODEL_NAME
    assert "Paris" in llm.invoke(FRANCE)
    assert engine.engines_created == created


def test_from_session_without_an_engine_says_no_model_is_loaded():
    with pytest.raises(NoEngineError, match="no model is loaded"):
        VLLM.from_session(EngineSession())


# ----- mistakes ---------------------------------------------------------------------------------------

def test_unknown_call_argument_is_a_request_error(engine):
    with pytest.raises(RequestError, match="temprature"):
        VLLM().invoke(FRANCE, temprature=0)


def test_unknown_constructor_argument_warns_and_is_dropped(engine):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = VLLM(api_key="x", temperature=0)
    assert any("api_key" in str(w.message) for w in caught)
    assert not hasattr(llm, "api_key")


def test_too_long_prompt_is_a_prompt_error_and_the_engine_stays_usable(engine):
    llm = VLLM(temperature=0, max_new_tokens=16)
    with pytest.raises(PromptTooLongError, match="tokens"):
        llm.invoke("word " * (engine.status().max_model_len + 10))
    assert "Paris" in llm.invoke(FRANCE)


def test_model_inside_vllm_kwargs_is_a_request_error(engine):
    with pytest.raises(RequestError, match="model="):
        VLLM(vllm_kwargs={"model": "other"})
