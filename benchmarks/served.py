"""The served engine: ``%%vllm`` against ``vllm serve`` over HTTP, beside the setup most users pick today.

``vllm serve`` plus the official ``openai`` client is the baseline of this group: the same prompts
through ``chat.completions`` (the server applies the chat template, as ``%%vllm`` does), the batch as
concurrent requests of one ``AsyncOpenAI`` client, the stream with ``stream=True``. Against the
same server, in the same interleaved runs, ``%%vllm`` of a session attached with ``--remote``; and
``%%vllm`` on the in-process engine, where the machine holds both engines (CPU; on one GPU the
in-process engine is unloaded before the server starts, and that row is left out).

The server is started the way ``%vllm_serve`` starts it, with the in-process engine's configuration;
its prefix cache is emptied before every run (``/reset_prefix_cache``, which vLLM's server offers in
its development mode), as the in-process engine's is.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from .frontends import (Workload, _stream_sample, batch_chat_abatch, batch_llm_batch, batch_magic, fresh_prefix_cache,
                        stream_magic)
from .measure import Sample

__all__ = ["Served", "start_served", "served_entries", "REMOTE_TARGETS"]

OPENAI = "vllm serve + openai client"
REMOTE = "%%vllm --remote (vllm serve)"
REMOTE_LLM = "LangChain llm.batch --remote"
REMOTE_CHAT = "LangChain ChatVLLM.abatch --remote"
IN_PROCESS = "%%vllm in-process"
#: What a session attached with --remote should cost over the openai client on the same server:
#: batch ratio, time to first text difference (ms), decode ratio.
REMOTE_TARGETS = {"batch": 1.0, "ttft_ms": 1.0, "decode": 0.98}
REMOTE_ROWS = (REMOTE, REMOTE_LLM, REMOTE_CHAT)


@dataclass
class Served:
    """A server of the in-process engine's configuration, and what the runs use to reach it."""

    owner: Any  # the EngineSession that started the server
    server: Any  # its ManagedServer
    remote: Any  # an EngineSession attached to it (``--remote``)
    local: Any  # the in-process session, or None when it had to make room for the server

    def stop(self) -> None:
        try:
            self.remote.unload()
        finally:
            self.owner.stop_server()

    def fresh(self) -> None:
        """Empty both engines' prefix caches (no run reuses another's prompt computation)."""
        import httpx

        answer = httpx.post(f"{self.server.url}/reset_prefix_cache", timeout=60)
        if answer.status_code != 200:
            raise RuntimeError(f"the server did not reset its prefix cache: HTTP {answer.status_code}")
        if self.local is not None and self.local.loaded:
            self.local.run_on_engine(fresh_prefix_cache)


def start_served(session: Any, config: Any = None) -> Served:
    """Serve ``session``'s engine configuration (unloading it first on a GPU), or ``config`` where
    the session has no engine, and attach to it."""
    from vllm_magic.engine.session import EngineSession

    local = session if session.loaded else None
    config = session.config if local is not None else config
    if local is not None and config.platform == "cuda":  # two copies of the model do not fit one GPU
        session.unload()
        local = None
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # for /reset_prefix_cache; the server inherits it
    try:
        owner = EngineSession()
        server = owner.serve(config.model, port=0, **config.requested)
    finally:
        del os.environ["VLLM_SERVER_DEV_MODE"]
    remote = EngineSession()
    remote.connect(server.url)
    return Served(owner, server, remote, local)


def _openai(served: Served) -> tuple[Any, Any]:
    from openai import AsyncOpenAI, OpenAI

    return (OpenAI(base_url=served.server.base_url, api_key="EMPTY"),
            AsyncOpenAI(base_url=served.server.base_url, api_key="EMPTY"))


def batch_openai(served: Served, w: Workload) -> Sample:
    _, client = _openai(served)
    model = served.server.model_name

    async def one(prompt: str) -> int:
        reply = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=w.tokens,
            extra_body={"ignore_eos": True})
        return reply.usage.completion_tokens

    async def all_of() -> list[int]:
        try:
            return await asyncio.gather(*(one(p) for p in w.prompts))
        finally:
            await client.close()

    start = time.perf_counter()
    counts = asyncio.run(all_of())
    seconds = time.perf_counter() - start
    return Sample(sum(counts) / seconds, {"seconds": seconds, "tokens": sum(counts)})


def stream_openai(served: Served, w: Workload) -> Sample:
    client, _ = _openai(served)
    start = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.chat.completions.create(
            model=served.server.model_name, messages=[{"role": "user", "content": w.stream_prompt}],
            temperature=0, max_tokens=w.stream_tokens, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    client.close()
    return _stream_sample(start, first, end, tokens)


def _on(workload_of: Callable[[Workload], Workload], fn: Callable[[Workload], Sample]) -> Callable[[Workload], Sample]:
    return lambda w: fn(workload_of(w))


def served_entries(served: Served, workloads: dict[int, tuple[Workload, Workload]]) -> tuple[list, list]:
    """The batch and the streaming entries of this group (``name, fn(workload), needs``), the
    baseline first. ``workloads`` maps each in-process workload (by id) to its (remote, local) twin."""
    def remote(w: Workload) -> Workload:
        return workloads[id(w)][0]

    def local(w: Workload) -> Workload:
        return workloads[id(w)][1]

    batch = [(OPENAI, lambda w: batch_openai(served, w), None),
             (REMOTE, _on(remote, batch_magic), None),
             (REMOTE_LLM, _on(remote, batch_llm_batch), None),
             (REMOTE_CHAT, _on(remote, batch_chat_abatch), None)]
    stream = [(OPENAI, lambda w: stream_openai(served, w), None),
              (REMOTE, _on(remote, stream_magic), None)]
    if served.local is not None:
        batch.append((IN_PROCESS, _on(local, batch_magic), None))
        stream.append((IN_PROCESS, _on(local, stream_magic), None))
    return batch, stream
