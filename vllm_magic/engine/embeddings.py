"""The session's embedding engine, beside its generation engine: ``%vllm_load --embed``,
``session.load_embedder()``, ``session.embed()``, ``VLLMEmbeddings``.

An :class:`Embedder` is one of two things:

* an engine in this kernel: vLLM's pooling runner (``runner="pooling"``; ``convert="embed"``, which
  also turns a text generation model such as the demo model into an embedding model). It is a
  :class:`~.backends.local.LocalBackend` started by :meth:`~.backends.local.LocalBackend.start`, so
  its processes, log, interrupts, shutdown and GPU memory plan are those of the generation engine;
  every call into it runs on its one driver thread;
* a vLLM server's ``/v1/embeddings`` (``vllm serve MODEL --runner pooling``), over HTTP.

Texts longer than the model's context are truncated to it (their last tokens are dropped), never
refused. Vectors are plain Python floats, in the order of the texts. Which pooling a model gets is
vLLM's choice: the model's own (a sentence-transformers model says it), else vLLM's default for a
converted decoder: the last token's hidden state, normalized. The demo model keeps that default:
over 16 questions and their 16 answers it ranked the right answer first for 15 (mean pooling: 14),
and a server started with ``--runner pooling --convert embed`` pools the same way.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Sequence

from ..errors import ConfigError, EngineDiedError, EngineStartError, RequestError, ServerError
from .backends.base import UnloadReport
from .backends.remote import answer_json, error_text, normalize_url, server_key, unreachable
from .config import EngineConfig, resolve_engine_config

__all__ = ["Embedder", "embedding_config", "check_embedding_config", "cosine", "NO_EMBEDDER"]

#: What a call for embeddings says when no embedder is loaded.
NO_EMBEDDER = ("no embedding model is loaded: run %vllm_load --embed (the demo model) or %vllm_load --embed MODEL "
               "(session.load_embedder() from Python) first")
#: The ``platform`` of an embedder that is a server elsewhere.
REMOTE_PLATFORM = "remote"
#: Seconds to wait for a server to accept a connection or answer a short call.
CONNECT_TIMEOUT = 10.0
#: What a new embedder embeds once, to learn its dimension (and that it embeds at all).
_PROBE = "dimension"


def embedding_config(model: str | os.PathLike | None, engine_kwargs: dict[str, Any]) -> EngineConfig:
    """The configuration of an in-process embedder of ``model`` (None: the demo model): vLLM's
    pooling runner, converting the model to an embedding model (``convert="embed"``) unless told
    otherwise, over the platform's defaults (:func:`~.config.resolve_engine_config`)."""
    kwargs = {k: v for k, v in engine_kwargs.items() if v is not None}
    runner = kwargs.pop("runner", "pooling")
    if runner != "pooling":
        raise ConfigError(f"an embedder runs vLLM's pooling runner, not --runner {runner}: leave --runner out")
    kwargs.setdefault("convert", "embed")
    return resolve_engine_config(model, runner="pooling", **kwargs)


def check_embedding_config(config: EngineConfig, log: Any) -> None:
    """Refuse, in one line and before anything starts, a configuration vLLM rejects or one it would
    pool for something else than embeddings (a classifier, token vectors)."""
    from .backends.local import short_reason
    from .compat import EngineArgs

    try:
        with log.capture(log.verbose):
            vllm_config = EngineArgs(**config.llm_kwargs()).create_engine_config()
    except Exception as exc:  # noqa: BLE001 - vLLM's reason, in one line
        reason = _reason(short_reason(exc))
        raise ConfigError(f"{config.short_name} cannot be loaded for embeddings: {reason}") from None
    model = vllm_config.model_config
    convert = getattr(model, "convert_type", None)
    pooler = getattr(model, "pooler_config", None)
    task = getattr(pooler, "task", None)
    if convert == "classify":
        raise ConfigError(f"{config.short_name} would be pooled into classes (--convert classify), not embeddings: "
                          "leave --convert out (or --convert embed)")
    if getattr(model, "runner_type", "pooling") != "pooling" or task not in (None, "embed"):
        raise ConfigError(f"{config.short_name} would be pooled for {task or 'another task'}, not embeddings: "
                          "leave the pooler's task out (or --pooler-config '{\"task\": \"embed\"}')")


def _reason(text: str) -> str:
    """vLLM's reason for refusing a configuration, without pydantic's preamble and vLLM's list of
    every architecture it knows (``%vllm_models`` says which models of this machine it runs)."""
    text = text.split("Value error, ", 1)[-1]
    listed = text.find("Supported architectures")
    if listed >= 0:
        text = text[:listed].rstrip(" .") + " (%vllm_models lists the models here that vLLM runs)"
    return text[:300]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """The cosine similarity of two vectors (0.0 when one of them is zero)."""
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    return dot / norm if norm else 0.0


class Embedder:
    """One embedding engine: a pooling engine in this kernel, or a vLLM server's embeddings.

    The session holds at most one (:meth:`EngineSession.load_embedder`), beside its generation
    engine and independent of it: loading, replacing or unloading one never touches the other.
    """

    def __init__(self, config: EngineConfig, dimension: int, max_model_len: int, load_seconds: float, *,
                 backend: Any = None, server: "_Server | None" = None) -> None:
        self.config = config
        #: Numbers per vector.
        self.dimension = dimension
        #: The context, in tokens: longer texts are truncated to it.
        self.max_model_len = max_model_len
        self.load_seconds = load_seconds
        self.started = time.monotonic()
        self._backend = backend  # a LocalBackend, for an engine in this kernel
        self._server = server

    # ----- starting ----------------------------------------------------------------------------
    @classmethod
    def start(cls, config: EngineConfig, log: Any, *, verbose: bool = False,
              progress: Callable[[str, float], None] | None = None) -> "Embedder":
        """A pooling engine for ``config`` in this kernel (see :meth:`LocalBackend.start`: on a GPU
        it is sized for the memory free now, beside whatever else holds the card, and refused in
        one line when it does not fit); whatever it started is gone when it fails."""
        from .backends.local import LocalBackend, short_reason
        from .compat import embed_texts, embedding_refusal

        t0 = time.perf_counter()
        try:
            backend = LocalBackend.start(config, log, verbose=verbose, progress=progress, on_finished=_nothing)
        except EngineStartError as exc:  # vLLM's words stay; what is left is said for embedders
            message = str(exc).replace("The session is empty", "No embedder is loaded (the generation engine is "
                                                                "untouched)")
            raise type(exc)(message) from None
        try:
            refusal = embedding_refusal(backend.llm)
            if refusal is not None:
                raise ConfigError(f"{config.short_name} gives no embeddings: {refusal}")
            try:
                dimension = len(backend.call(lambda llm: embed_texts(llm, [_PROBE]))[0])
            except Exception as exc:  # noqa: BLE001 - vLLM cannot embed with it after all
                raise ConfigError(f"{config.short_name} gives no embeddings: {short_reason(exc)}") from None
        except BaseException:
            backend.shutdown()
            raise
        log.mark(f"embedder {config.model} ready: {dimension} dimensions")
        return cls(config, dimension, backend.max_model_len, time.perf_counter() - t0, backend=backend)

    @classmethod
    def connect(cls, url: str, *, api_key: str | None = None, model: str | None = None) -> "Embedder":
        """The embeddings of the vLLM server at ``url`` (``model``: which of its models; None: the
        first). Raises :class:`ServerError` in one line when it cannot be reached, wants another key,
        does not serve ``model``, or serves no embeddings (a server of a text generation model)."""
        t0 = time.perf_counter()
        server = _Server.connect(url, api_key, model)
        config = EngineConfig(model=server.name, engine_kwargs={}, platform=REMOTE_PLATFORM)
        return cls(config, server.dimension, server.max_model_len, time.perf_counter() - t0, server=server)

    # ----- what it is ----------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """``"local"`` (an engine in this kernel) or ``"remote"`` (a server elsewhere)."""
        return "local" if self._backend is not None else "remote"

    @property
    def url(self) -> str | None:
        """The server's URL (``kind == "remote"``), else None."""
        return None if self._server is None else self._server.url

    @property
    def backend(self) -> Any:
        """The in-process engine (a ``LocalBackend``), or None for a server; for tests and benchmarks."""
        return self._backend

    @property
    def dtype(self) -> str:
        return "n/a" if self._backend is None else self._backend.dtype

    def serves(self, wanted: EngineConfig) -> bool:
        """Whether this embedder serves a load request for ``wanted`` (the session's one rule)."""
        backend = self._backend
        return (backend is not None and self.death() is None
                and self.config.serves(wanted, backend.derived_args))

    def attached_to(self, url: str, api_key: str | None, model: str | None) -> bool:
        """Whether this is the server at ``url`` with ``api_key``, serving ``model`` (None: any)."""
        server = self._server
        return server is not None and self.death() is None and server.is_for(url, api_key, model)

    # ----- work ------------------------------------------------------------------------------------
    def embed(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, in order (texts longer than the context are truncated to it)."""
        if self._server is not None:
            return self._server.embed(texts)
        from .compat import embed_texts

        return self._run(lambda llm: embed_texts(llm, texts), "embed the texts")

    def score(self, query: str, documents: list[str]) -> list[float]:
        """How similar each document is to ``query``: vLLM's ``LLM.score`` (for an embedding model,
        the cosine similarity of their embeddings); a server's embeddings compared here the same way."""
        if self._server is not None:
            query_vector, *vectors = self._server.embed([query, *documents])
            return [cosine(query_vector, vector) for vector in vectors]
        from .compat import score_texts, scoring_refusal

        refusal = scoring_refusal(self._backend.llm)
        if refusal is not None:
            raise RequestError(f"{self.config.short_name} cannot score: {refusal}")
        return self._run(lambda llm: score_texts(llm, query, documents), "score the documents")

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(llm)`` with the raw ``vllm.LLM`` on the engine's driver thread (in-process only)."""
        if self._backend is None:
            raise RequestError(f"the embedder at {self.url} is a server: it has no vllm.LLM in this process")
        self._check_alive()
        return self._backend.call(fn)

    def _run(self, fn: Callable[[Any], Any], what: str) -> Any:
        """``fn(llm)`` on the driver thread: the engine is only ever stepped by that thread, and an
        interrupt here leaves it running (the call finishes there, its result is dropped)."""
        from .backends.local import short_reason

        self._check_alive()
        try:
            return self._backend.call(fn)
        except EngineDiedError:
            raise EngineDiedError(self._died_message(self.death() or "it was shut down")) from None
        except Exception as exc:  # noqa: BLE001 - vLLM refused these texts; the engine goes on
            raise RequestError(f"vLLM could not {what}: {short_reason(exc)}") from None

    # ----- health and memory -------------------------------------------------------------------
    def death(self) -> str | None:
        """Why it cannot embed any more, or None while it can."""
        if self._server is not None:
            return self._server.failure
        return self._backend.death()

    def _check_alive(self) -> None:
        reason = self.death()
        if reason is not None:
            raise EngineDiedError(self._died_message(reason))

    def _died_message(self, reason: str) -> str:
        return (f"the embedding engine of {self.config.short_name} died ({reason}); run %vllm_load --embed "
                "(session.load_embedder()) again")

    def memory(self) -> tuple[int | None, str]:
        """``(bytes, what they are)`` it holds here (a server's: None)."""
        if self._backend is None:
            return None, "on the server"
        return self._backend.memory()

    def remaining_after(self, backend: Any) -> Any:
        """The device memory in use once ``backend`` (the generation engine) is gone while this
        embedder keeps running: what its shutdown waits for. ``"own"`` where the engine's own
        baseline is right: off NVIDIA GPUs, and when this embedder started before it (its baseline
        counts the embedder already)."""
        mine = self._backend
        if (mine is None or backend.config.platform != "cuda" or mine.started < backend.started
                or self.death() is not None):
            return "own"
        return _in_use_without(backend)

    def loaded_line(self, already: bool = False) -> str:
        """The load line: what embeds where, and how long it took (or that it was already there)."""
        name = self.config.short_name
        if self._server is not None:
            if already:
                return f"{name} already attached for embeddings (vLLM server at {self.url})"
            return (f"{name} embeds on the vLLM server at {self.url} ({self.dimension} dimensions, context "
                    f"{self.max_model_len:,} tokens), attached in {self.load_seconds:.1f} s")
        platform = self.config.platform
        if already:
            given = "".join(f", {k}={v}" for k, v in sorted(self.config.requested.items())
                            if k not in ("runner", "convert"))
            return f"{name} already loaded for embeddings ({platform}, {self.dtype}{given})"
        return (f"{name} loaded for embeddings on {platform} ({self.dtype}, {self.dimension} dimensions, context "
                f"{self.max_model_len:,} tokens) in {self.load_seconds:.1f} s")

    def describe(self) -> str:
        """One line for ``%vllm_status``: model, where, dimension, context, memory."""
        name = f"`{self.config.short_name}`"
        dead = self.death()
        if dead is not None:
            return f"{name}: dead ({dead}); %vllm_load --embed starts it again"
        shape = f"{self.dimension} dimensions, context {self.max_model_len:,} tokens"
        if self._server is not None:
            return f"{name} on the vLLM server at {self.url} ({shape})"
        memory, kind = self.memory()
        held = "n/a" if memory is None else f"{memory / (1 << 30):.2f} GiB ({kind})"
        return f"{name} in this kernel on {self.config.platform} ({self.dtype}, {shape}); memory {held}"

    # ----- stopping ------------------------------------------------------------------------------
    def shutdown(self) -> UnloadReport:
        """Stop the engine and wait until its processes and device memory are gone (a server:
        let go of it; it keeps running)."""
        if self._server is not None:
            self._server.close()
            return UnloadReport(self.config.model, 0, 0, None, None)
        backend = self._backend
        # what stays in use once its processes are gone, whoever else started since (a generation engine)
        return backend.shutdown(_in_use_without(backend) if backend.config.platform == "cuda" else "own")


def _in_use_without(backend: Any) -> Any:
    """The GPU memory in use once ``backend`` is gone and every other engine stays (what its shutdown
    waits for), or ``"own"`` (its own baseline) where the card or the engine does not say."""
    from .gpu_memory import device_memory_used

    used, (own, _) = device_memory_used("cuda"), backend.memory()
    return "own" if used is None or own is None else used - own


class _Server:
    """A vLLM server's ``/v1/embeddings``, over one HTTP client (safe to share between threads)."""

    def __init__(self, url: str, api_key: str | None, name: str, max_model_len: int, client: Any) -> None:
        self.url = url
        self.api_key = api_key
        self.name = name
        self.max_model_len = max_model_len
        self.dimension = 0
        self.failure: str | None = None
        self._client = client

    @classmethod
    def connect(cls, url: str, api_key: str | None, model: str | None) -> "_Server":
        import httpx

        url = normalize_url(url)
        api_key = server_key(api_key)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(CONNECT_TIMEOUT, read=None)
        if url.startswith("unix:"):  # a server on a Unix socket
            client = httpx.Client(transport=httpx.HTTPTransport(uds=url[5:]), base_url="http://localhost",
                                  headers=headers, timeout=timeout)
        else:
            client = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        try:
            try:
                response = client.get("/v1/models")
            except httpx.HTTPError as exc:
                raise unreachable(url, exc) from None
            served = [e for e in answer_json(response, "/v1/models", url, api_key).get("data", [])
                      if isinstance(e, dict)]
            if not served:
                raise ServerError(f"the server at {url} serves no model")
            matches = [e for e in served if model in (None, e.get("id"), e.get("root"))]
            if not matches:
                names = ", ".join(repr(e.get("id")) for e in served)
                raise ServerError(f"the server at {url} does not serve {model!r}; it serves {names}")
            entry = matches[0]
            server = cls(url, api_key, str(entry["id"]), int(entry.get("max_model_len") or 0), client)
            response = server._post([_PROBE])
            if response.status_code != 200:
                raise ServerError(f"the server at {url} serves no embeddings for {server.name} "
                                  f"({error_text(response)}): start one with `vllm serve MODEL --runner pooling`, "
                                  "or run the embedder here with %vllm_load --embed")
            server.dimension = len(response.json()["data"][0]["embedding"])
        except BaseException:
            client.close()
            raise
        return server

    def is_for(self, url: str, api_key: str | None, model: str | None) -> bool:
        api_key = server_key(api_key)
        return normalize_url(url) == self.url and api_key == self.api_key and model in (None, self.name)

    def _post(self, texts: list[str]) -> Any:
        import httpx

        body = {"model": self.name, "input": texts, "encoding_format": "float", "truncate_prompt_tokens": -1}
        try:
            response = self._client.post("/v1/embeddings", json=body)
        except httpx.HTTPError as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            self.failure = f"the server at {self.url} does not answer ({reason})"
            raise ServerError(f"{self.failure}; start it again, or load another embedder") from None
        self.failure = None
        return response

    def embed(self, texts: list[str]) -> list[list[float]]:
        response = self._post(texts)
        if response.status_code != 200:
            raise RequestError(f"the server at {self.url} refused the texts: {error_text(response)}")
        data = sorted(response.json()["data"], key=lambda item: item["index"])
        return [[float(x) for x in item["embedding"]] for item in data]

    def close(self) -> None:
        self._client.close()


def _nothing(_handle: Any) -> None:
    """An embedder finishes no generation request: nothing to count."""
