"""A vLLM server elsewhere behind the session's backend seam: ``%vllm_load --remote URL``.

:class:`RemoteBackend` drives any OpenAI-compatible vLLM server (``vllm serve``, one started by
``%vllm_serve``, a multi-GPU or multi-node deployment) so that every front-end works as with the
in-process engine. Prompts are rendered and tokenized as the server does it: by the server
(``/tokenize``, its own chat template), or here, where the served model's tokenizer files can be
read and render a few probe prompts exactly as the server does (checked once); then they go as token
ids to ``/v1/completions`` with ``return_token_ids``: the engine sees exactly what an in-process
engine would, so greedy answers are the same. Watched requests stream,
one HTTP stream each; a batch nobody watches (``submit(..., stream=False)``: LangChain's invoke and
batch, large ``%%vllm`` batches) goes as one non-streamed request for all its prompts, which spares
the server an event per token and the client hundreds of connections. A prompt's rendered text is
fetched (``/detokenize``) only when somebody reads it. Structured outputs go through vLLM's extra
request fields. Closing a request's HTTP stream makes the server abort it, which is how an interrupt
or the Stop button reaches it.

Nothing here imports vLLM: a laptop without it can drive a GPU box that has it. All HTTP runs on
one event loop thread (``httpx``), so a batch of hundreds of prompts is hundreds of concurrent
streams, not hundreds of threads.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import threading
import time
import uuid
from typing import Any, Callable, Coroutine

from ...errors import PromptTooLongError, RequestError, ServerError, SleepError
from .base import Backend, ReadyRequest, SleepReport, UnloadReport
from ..compat import version_tuple
from ..config import EngineConfig
from ..gpu_memory import gpu_memory_of
from ..requests.adapters import BASE, Adapter, AdapterError, check_name, read_adapter, unknown_adapter
from ..requests.handles import RequestHandle
from ..requests.logprobs import from_openai_completion, from_server_prompt_logprobs, openai_ids
from ..requests.prompts import Prepared, PromptLike, PromptRenderer, TokenPrompt, conversation_of
from ..requests.sampling import SAMPLING_FIELDS, json_schema_of, sampling_values

__all__ = ["RemoteBackend", "RemoteParams", "REMOTE_PLATFORM", "normalize_url"]

#: The ``platform`` of a session attached to a server.
REMOTE_PLATFORM = "remote"
#: Batches of at most this many prompts to a persisted engine are rendered by it (``/tokenize``) until
#: a larger batch made the local renderer.
SERVER_RENDERED = 8
#: Seconds to wait for a server to accept a connection or answer a short call.
CONNECT_TIMEOUT = 10.0


def normalize_url(url: str) -> str:
    """``host:port``, ``http://host:port/`` or an OpenAI ``base_url`` (``.../v1``) -> ``http://host:port``;
    ``unix:/path/to/socket`` (a server started with ``--uds``) stays as it is."""
    url = url.strip().rstrip("/")
    if not url:
        raise RequestError("give the server's URL, e.g. http://127.0.0.1:8000")
    if url.startswith("unix:"):
        return url
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[:-3]
    return url.rstrip("/")


class RemoteParams:
    """The sampling options of one request to a server: what ``SamplingParams`` is in process.

    Read options as attributes (``params.n``, ``params.max_tokens``); :meth:`body` gives the fields
    of a ``/v1/completions`` request.
    """

    def __init__(self, values: dict[str, Any], structured: dict[str, Any] | None = None) -> None:
        self.values = dict(values)
        self.structured = {k: v for k, v in (structured or {}).items() if v is not None}

    @classmethod
    def from_sampling_params(cls, sampling: Any) -> "RemoteParams":
        """The options of a ready vLLM ``SamplingParams`` (its fields that a request can carry)."""
        values = {name: getattr(sampling, name) for name in SAMPLING_FIELDS if getattr(sampling, name, None) is not None}
        structured: dict[str, Any] = {}
        spec = getattr(sampling, "structured_outputs", None) or getattr(sampling, "guided_decoding", None)
        if spec is not None:
            for ours, theirs in (("json_schema", "json"), ("regex", "regex"), ("choice", "choice")):
                if getattr(spec, theirs, None) is not None:
                    structured[ours] = getattr(spec, theirs)
        return cls(values, structured)

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        if name == "n":
            return 1
        if name in SAMPLING_FIELDS:
            return None
        raise AttributeError(name)

    def clone(self) -> "RemoteParams":
        return copy.deepcopy(self)

    def body(self, structured_key: str = "structured_outputs") -> dict[str, Any]:
        """The request fields of these options (vLLM's extra fields for structured outputs)."""
        body = {k: v for k, v in self.values.items() if v is not None}
        spec = {{"json_schema": "json"}.get(k, k): v for k, v in self.structured.items()}
        if spec:
            if structured_key == "structured_outputs":
                body["structured_outputs"] = spec
            else:  # vLLM before structured_outputs: guided_json, guided_regex, guided_choice
                body.update({f"guided_{k}": v for k, v in spec.items()})
        return body

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in {**self.values, **self.structured}.items())
        return f"RemoteParams({fields})"


class _PromptText:
    """A prompt's text as the server's chat template rendered it, fetched (``/detokenize``) the first
    time somebody reads it: a batch whose prompts nobody reads costs no request for them."""

    def __init__(self, loop: "_Loop", fetch: Callable[[], Coroutine[Any, Any, str]]) -> None:
        self._loop = loop
        self._fetch: Callable[[], Coroutine[Any, Any, str]] | None = fetch
        self._text: str | None = None
        self._lock = threading.Lock()

    def done(self) -> bool:
        return self._text is not None

    def result(self) -> str:
        with self._lock:
            if self._text is None:
                if threading.current_thread() is self._loop.thread:  # it cannot wait for itself
                    return ""
                fetch, self._fetch = self._fetch, None
                try:
                    self._text = self._loop.run(fetch(), timeout=CONNECT_TIMEOUT) if fetch is not None else ""
                except Exception:  # noqa: BLE001 - a prompt that cannot be shown must not fail its answer
                    self._text = ""
            return self._text


class _Loop:
    """One event loop thread with one HTTP client: every call to the server runs here."""

    def __init__(self, url: str, api_key: str | None) -> None:
        import httpx

        self._httpx = httpx
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-magic-http", daemon=True)
        self.thread.start()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

        limits = httpx.Limits(max_connections=2048, max_keepalive_connections=256)

        async def make() -> Any:
            timeout = httpx.Timeout(CONNECT_TIMEOUT, read=None)
            if url.startswith("unix:"):  # a server on a Unix socket (a persisted engine)
                return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=url[5:], limits=limits),
                                         base_url="http://localhost", headers=headers, timeout=timeout)
            return httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits)

        self.client = self.run(make())

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run ``coro`` on the loop and wait for its value; Ctrl-C cancels it and is raised."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                try:
                    return future.result(timeout=0.05)
                except TimeoutError:
                    if deadline is not None and time.monotonic() > deadline:
                        future.cancel()
                        raise
        except KeyboardInterrupt:
            future.cancel()
            raise

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> "asyncio.Future[Any]":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if not self.loop.is_running():
            return
        try:
            self.run(self.client.aclose(), timeout=5)
        except Exception:  # noqa: BLE001 - closing a client to a server that is gone
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class RemoteBackend(Backend):
    """An OpenAI-compatible vLLM server, driven over HTTP."""

    kind = "remote"

    def __init__(self, url: str, api_key: str | None, model: str, max_model_len: int, version: str,
                 on_finished: Callable[[RequestHandle], None], loop: _Loop, load_seconds: float) -> None:
        self.url = url
        self.api_key = api_key
        self.config = EngineConfig(model=model, engine_kwargs={}, platform=REMOTE_PLATFORM)
        #: The name requests give as ``model`` (the server's served model name).
        self.served_name = model
        self.root = model  # where the server loaded the model from (``connect`` reads it)
        self.dtype = "n/a"
        self.max_model_len = max_model_len
        self.kv_cache_tokens = None
        self.vllm_version = version
        self.load_seconds = load_seconds
        self.started = time.monotonic()
        self._on_finished = on_finished
        self._loop = loop
        self._live: dict[str, Any] = {}  # request id -> the concurrent Future of its HTTP request
        #: request id -> the ids of the requests still live in the same HTTP request (a whole batch)
        self._sharing: dict[str, set[str]] = {}
        self._batched: dict[str, RequestHandle] = {}  # the handles of those requests
        self._local: PromptRenderer | bool | None = None  # see _local_renderer
        self._local_lock = threading.Lock()
        self._live_lock = threading.Lock()
        self._failure: str | None = None
        self._texts: dict[int, str] = {}  # token id -> its text (logprobs name tokens by id)
        self._structured_key = "structured_outputs" if (version_tuple(version) or (0,)) >= (0, 10, 2) else "guided"
        self._prefix = uuid.uuid4().hex[:8]  # request ids unique on a server that several sessions share
        self._adapters: dict[str, Adapter] = {}  # what /v1/models lists beside the model (_note_adapters)
        #: The persisted engine this is attached to (``%vllm_load --persist``), or None.
        self.persisted: Any = None

    # ----- connecting ------------------------------------------------------------------------------
    @classmethod
    def connect(cls, url: str, *, api_key: str | None = None, model: str | None = None,
                on_finished: Callable[[RequestHandle], None]) -> "RemoteBackend":
        """Attach to the server at ``url``; raises :class:`ServerError` with one clear paragraph when
        it cannot be reached, wants another key, or does not serve ``model``. ``api_key`` None takes
        ``$VLLM_API_KEY`` (the variable ``vllm serve`` reads) when it is set."""
        url = normalize_url(url)
        api_key = server_key(api_key)
        t0 = time.perf_counter()
        loop = _Loop(url, api_key)
        try:
            models = loop.run(_get_json(loop.client, "/v1/models", url, api_key), timeout=CONNECT_TIMEOUT * 2)
            served = [entry for entry in models.get("data", []) if isinstance(entry, dict)]
            if not served:
                raise ServerError(f"the server at {url} serves no model")
            names = [entry.get("id") for entry in served]
            if model is None:
                entry = served[0]
            else:
                matches = [e for e in served if e.get("id") == model or e.get("root") == model]
                if not matches:
                    raise ServerError(f"the server at {url} does not serve {model!r}; it serves "
                                      f"{', '.join(map(repr, names))} (pass one with --model, or none)")
                entry = matches[0]
            name = str(entry["id"])
            max_model_len = entry.get("max_model_len")
            version = "unknown"
            try:
                version = str(loop.run(_get_json(loop.client, "/version", url, api_key), timeout=CONNECT_TIMEOUT)
                              .get("version", "unknown"))
            except ServerError:
                pass  # an older server without /version still serves
            probe = loop.run(_post(loop.client, "/tokenize", {"model": name, "prompt": "Hi"}), timeout=CONNECT_TIMEOUT)
            if probe.status_code == 404:
                raise ServerError(f"the server at {url} is OpenAI-compatible but not vLLM (it has no /tokenize "
                                  "route); vllm-magic drives vLLM servers")
            if max_model_len is None and probe.status_code == 200:
                max_model_len = probe.json().get("max_model_len")
        except BaseException:
            loop.close()
            raise
        backend = cls(url, api_key, name, int(max_model_len or 0) or 1 << 30, version, on_finished, loop,
                      time.perf_counter() - t0)
        backend.root = str(entry.get("root") or name)  # where the server loaded the model from
        backend._note_adapters(served)
        return backend

    def adopt(self, engine: Any) -> None:
        """Attach this kernel to the persisted engine it talks to: the session then sees the engine's
        own configuration (the "serves" rule finds it again), its memory and its sleep routes."""
        self.persisted = engine
        self.config = engine.config
        self.dtype = str(engine.config.engine_kwargs.get("dtype", "auto"))
        if not engine.derived:
            engine.derived = {"max_model_len": self.max_model_len}
            engine.write()
        engine.lease()
        self._sync_sleep()

    @property
    def tokenizer(self) -> Any:
        """The served model's tokenizer, loaded here from where the server loaded the model (a
        directory this machine shares, or a Hub id) when vLLM's parsers need it."""
        tokenizer = self.__dict__.get("_tokenizer")
        if tokenizer is None:
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(self.root)
            except Exception as exc:  # noqa: BLE001 - no transformers, no access to the model's files
                raise RequestError(
                    f"vLLM's reasoning and tool call parsers read the model's tokenizer, and it could not be "
                    f"loaded here from {self.root!r} "
                    f"({' '.join(str(exc).split())[:160]})") from None
            self._tokenizer = tokenizer
        return tokenizer

    def attached_to(self, url: str, api_key: str | None, model: str | None) -> bool:
        api_key = server_key(api_key)
        return (normalize_url(url) == self.url and api_key == (self.api_key or None)
                and model in (None, self.served_name))

    # ----- requests --------------------------------------------------------------------------------
    def _params(self, defaults: Any, overrides: dict[str, Any], structured: dict[str, Any]) -> RemoteParams:
        structured = dict(structured)
        if structured.get("json_schema") is not None:
            structured["json_schema"] = json_schema_of(structured["json_schema"])
        return RemoteParams(sampling_values(defaults, overrides), structured)

    def _given_params(self, sampling: Any) -> RemoteParams:
        return RemoteParams.from_sampling_params(sampling)

    def render(self, prompts: list[PromptLike], raw: bool, system: str,
               template: dict[str, Any] | None = None) -> list[Prepared]:
        # A persisted engine renders a few prompts itself until a batch is worth importing transformers
        # here (seconds, and on a small machine they would slow the engine's first answers after a restart).
        lazy = self.persisted is not None and self._local is None and len(prompts) <= SERVER_RENDERED
        local = None if lazy else self._local_renderer()
        if local is not None:  # the server's own rendering, done here: no request per prompt
            return local.prepare(prompts, raw, system, template)
        async def all_of() -> list[Prepared]:
            return list(await asyncio.gather(*(self._prepare_one(item, raw, system, template) for item in prompts)))

        prepared = self._loop.run(all_of())
        for item in prepared:
            if len(item.token_ids) >= self.max_model_len:
                raise PromptTooLongError(
                    f"the prompt has {len(item.token_ids)} tokens but the model's context holds "
                    f"{self.max_model_len} (prompt plus answer); shorten it or serve the model with a larger "
                    "--max-model-len")
        return prepared

    #: Prompts the server renders once to check that this process renders them the same way.
    _PROBES: tuple[tuple[PromptLike, bool], ...] = (
        ("The capital of France is", True),
        ([{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hi there!"},
          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a planet, { and } too."}],
         False),
        ("What is 2 + 2?", False))

    def _local_renderer(self) -> PromptRenderer | None:
        """A renderer of the served model's own tokenizer and chat template in this process, where
        its files can be read here (a server on this machine, a Hub model in the local cache) and
        it renders the probes token for token as the server does; else None, and every prompt is
        rendered by the server (``/tokenize``). Decided once."""
        if self._local is None:
            with self._local_lock:
                if self._local is None:
                    self._local = self._checked_renderer() or False
        return self._local or None

    def _checked_renderer(self) -> PromptRenderer | None:
        try:
            from transformers import AutoTokenizer

            # Files on this machine only: a notebook without network must not wait for the Hub here.
            tokenizer = AutoTokenizer.from_pretrained(self.root, local_files_only=True)
            renderer = PromptRenderer(tokenizer, self.max_model_len)
            mine = [renderer.prepare([prompt], raw, "")[0].token_ids for prompt, raw in self._PROBES]
        except Exception:  # noqa: BLE001 - no transformers here, no access to the model's files
            return None

        async def all_probes() -> list[Prepared]:
            return list(await asyncio.gather(*(self._prepare_one(prompt, raw, "") for prompt, raw in self._PROBES)))

        try:
            theirs = self._loop.run(all_probes(), timeout=CONNECT_TIMEOUT * 3)
        except Exception:  # noqa: BLE001 - the server's own rendering stays the way; it reports its errors
            return None
        if mine != [p.token_ids for p in theirs]:
            return None
        self.__dict__.setdefault("_tokenizer", tokenizer)  # the one the server uses: vLLM's parsers read it too
        return renderer

    async def _prepare_one(self, item: PromptLike, raw: bool, system: str,
                           template: dict[str, Any] | None = None) -> Prepared:
        if isinstance(item, TokenPrompt):  # sent as is; its text fetched only if somebody reads it
            tokens = list(item.token_ids)
            return Prepared(_PromptText(self._loop, lambda: self._detokenize(tokens)), tokens)
        if isinstance(item, str) and raw:
            tokens = await self._tokenize({"prompt": item})
            return Prepared(item, tokens)
        messages = conversation_of(item, system)
        try:
            template = dict(template or {})
            extra = {"tools": template.pop("tools")} if template.get("tools") else {}
            if template:
                extra["chat_template_kwargs"] = template
            tokens = await self._tokenize({"messages": messages, "add_generation_prompt": True, **extra})
        except RequestError as exc:
            if "chat template" not in str(exc):
                raise
            text = "\n\n".join(m["content"] for m in messages)  # a base model: the contents as plain text
            return Prepared(text, await self._tokenize({"prompt": text}))
        # The text is only shown (--show-prompt, result.prompt): it is fetched when first read.
        return Prepared(_PromptText(self._loop, lambda: self._detokenize(tokens)), tokens)

    async def _detokenize(self, tokens: list[int]) -> str:
        try:
            return str((await self._call("/detokenize", {"model": self.served_name, "tokens": tokens}))["prompt"])
        except Exception:  # noqa: BLE001 - a prompt that cannot be shown must not fail its answer
            return ""

    async def _tokenize(self, body: dict[str, Any]) -> list[int]:
        answer = await self._call("/tokenize", {"model": self.served_name, **body})
        return list(answer["tokens"])

    async def _call(self, path: str, body: dict[str, Any]) -> Any:
        response = await _post(self._loop.client, path, body, url=self.url, on_failure=self._failed)
        if response.status_code != 200:
            raise RequestError(f"the server refused the prompt: {error_text(response)}")
        return response.json()

    def _fit(self, params: Any, prompt_tokens: int) -> Any:
        room = self.max_model_len - prompt_tokens
        if params.max_tokens is None or params.max_tokens > room:
            params = params.clone()
            params.values["max_tokens"] = room
        return params

    # ----- LoRA adapters ---------------------------------------------------------------------------
    def _note_adapters(self, served: list[dict[str, Any]]) -> None:
        """The adapters in a ``/v1/models`` answer: the entries whose parent is the served model."""
        self._adapters = {str(e["id"]): Adapter(name=str(e["id"]), path=str(e.get("root") or e["id"]),
                                                origin="server")
                          for e in served if e.get("parent") == self.served_name and e.get("id")}
        if self._adapters:
            self.lora_enabled = True

    def _refresh_adapters(self) -> None:
        models = self._loop.run(_get_json(self._loop.client, "/v1/models", self.url, self.api_key),
                                timeout=CONNECT_TIMEOUT * 2)
        self._note_adapters([e for e in models.get("data", []) if isinstance(e, dict)])

    @property
    def adapters(self) -> dict[str, Adapter]:
        return dict(self._adapters)

    def lora_refusal(self) -> str | None:
        return None  # the server decides: its /v1/models lists what it runs

    def lora_request(self, name: str | None) -> Any:
        if name is not None and name != BASE and name not in self.adapters:
            self._refresh_adapters()  # loaded at runtime by another client since
        return super().lora_request(name)

    def _engine_lora(self, adapter: Adapter) -> Any:
        return adapter.name  # a request names its adapter as its model

    def add_adapter(self, name: str, path: str, *, any_base: bool = False) -> Adapter:
        """Load an adapter into the server at runtime (``/v1/load_lora_adapter``; ``path`` is where
        the server finds it). Checked here first when this machine sees the same directory."""
        check_name(name)
        if os.path.isdir(os.path.expanduser(path)):
            path = read_adapter(name, path).path
        self._refresh_adapters()
        known = self.adapters.get(name)
        if known is not None:
            if known.path == path:
                return known
            self.remove_adapter(name)
        response = self._loop.run(_post(self._loop.client, "/v1/load_lora_adapter",
                                        {"lora_name": name, "lora_path": path}), timeout=None)
        if response.status_code == 404:
            raise AdapterError(f"the server at {self.url} does not load adapters at runtime: start it with "
                               "--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment, or "
                               "name them when it starts (vllm serve ... --lora-modules NAME=PATH)")
        if response.status_code != 200:
            raise AdapterError(f"the server at {self.url} could not load adapter {name} from {path}: "
                               f"{error_text(response)}")
        self._refresh_adapters()
        return self.adapters.get(name) or Adapter(name=name, path=path)

    def remove_adapter(self, name: str) -> Adapter:
        self._refresh_adapters()
        adapter = self.adapters.get(name)
        if adapter is None:
            raise unknown_adapter(name, sorted(self.adapters))
        response = self._loop.run(_post(self._loop.client, "/v1/unload_lora_adapter", {"lora_name": name}),
                                  timeout=None)
        if response.status_code != 200:
            raise AdapterError(f"the server at {self.url} did not unload adapter {name}: {error_text(response)}")
        self._refresh_adapters()
        return adapter

    def add(self, requests: list[tuple[RequestHandle, ReadyRequest]]) -> None:
        whole: dict[str, tuple[dict[str, Any], list[tuple[RequestHandle, ReadyRequest]]]] = {}
        for handle, ready in requests:
            body = ready.params.body(self._structured_key)
            body["model"] = ready.lora or self.served_name
            if body.get("logprobs") is not None or body.get("prompt_logprobs") is not None:
                body["return_tokens_as_token_ids"] = True  # alternatives by id: a branch continues from one
            # vLLM sends prompt logprobs only in a whole answer, not in a stream's chunks
            if ready.stream and body.get("prompt_logprobs") is None:
                body = {"prompt": ready.prompt.token_ids, "stream": True,
                        "stream_options": {"include_usage": True},  # its usage tells the cached prompt tokens
                        "return_token_ids": True, "request_id": f"{self._prefix}-{handle.request_id}", **body}
                with self._live_lock:
                    self._live[handle.request_id] = self._loop.spawn(self._stream(handle, body))
            else:  # requests of one sampling setting share one HTTP request
                whole.setdefault(json.dumps(body, sort_keys=True, default=str), (body, []))[1].append((handle, ready))
        for options, group in whole.values():
            handles = [handle for handle, _ in group]
            body = {"prompt": [ready.prompt.token_ids for _, ready in group],
                    "stream": False, "return_token_ids": True,
                    "request_id": f"{self._prefix}-{handles[0].request_id}-{len(handles)}",
                    **options}
            sharing = {handle.request_id for handle in handles}
            with self._live_lock:
                future = self._loop.spawn(self._whole(handles, body, group[0][1].params.n or 1))
                for handle in handles:
                    self._live[handle.request_id] = future
                    self._sharing[handle.request_id] = sharing
                    self._batched[handle.request_id] = handle

    async def _whole(self, handles: list[RequestHandle], body: dict[str, Any], n: int) -> None:
        """One non-streamed request for a batch: each answer arrives whole (choice ``i * n + j`` is
        answer ``j`` of prompt ``i``)."""
        httpx = self._loop._httpx
        try:
            try:
                response = await self._loop.client.post("/v1/completions", json=body)
            except asyncio.CancelledError:  # aborted here: the connection closes and the server aborts
                for handle in handles:
                    handle.finish(aborted=True, then=self._on_finished)
                raise
            if response.status_code != 200:
                error = RequestError(f"the server refused the request: {error_text(response)}")
                for handle in handles:
                    handle.finish(error=error)
                return
            answer = response.json()
            cached = _cached_tokens(answer) if len(handles) == 1 else None  # usage covers the whole batch
            for choice in answer.get("choices", ()):
                prompt, index = divmod(int(choice.get("index", 0)), n)
                if prompt < len(handles):
                    handle = handles[prompt]
                    token_ids = list(choice.get("token_ids") or ())
                    if not handle.prompt_noted:
                        prompt_logprobs = choice.get("prompt_logprobs")
                        handle.note_prompt(None if not prompt_logprobs else from_server_prompt_logprobs(
                            prompt_logprobs, handle.prompt_token_ids, body.get("prompt_logprobs")), cached)
                    handle.push(index, choice.get("text") or "", token_ids, choice.get("finish_reason"),
                                await self._logprobs(choice, token_ids, body))
            for handle in handles:
                handle.finish(then=self._on_finished)
        except httpx.HTTPError as exc:
            reason = self._failed(exc)
            for handle in handles:
                handle.finish(error=ServerError(f"the server at {self.url} went away mid-answer ({reason}); start "
                                                "it again, or %vllm_load another engine"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a malformed answer must not kill the loop
            for handle in handles:
                handle.finish(error=ServerError(f"unexpected answer from the server at {self.url}: {exc}"))
        finally:
            with self._live_lock:
                for handle in handles:
                    self._live.pop(handle.request_id, None)
                    self._sharing.pop(handle.request_id, None)
                    self._batched.pop(handle.request_id, None)

    async def _stream(self, handle: RequestHandle, body: dict[str, Any]) -> None:
        httpx = self._loop._httpx
        try:
            async with self._loop.client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    handle.finish(error=RequestError(f"the server refused the request: {error_text(response)}"))
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        error = chunk["error"]
                        message = error.get("message", error) if isinstance(error, dict) else error
                        handle.finish(error=RequestError(f"the server stopped the request: {message}"))
                        return
                    cached = _cached_tokens(chunk)
                    if cached is not None:
                        handle.note_prompt(cached_tokens=cached)
                    for choice in chunk.get("choices", ()):
                        token_ids = list(choice.get("token_ids") or ())
                        handle.push(int(choice.get("index", 0)), choice.get("text") or "", token_ids,
                                    choice.get("finish_reason"), await self._logprobs(choice, token_ids, body))
            handle.finish(then=self._on_finished)
        except asyncio.CancelledError:  # aborted here: closing the stream made the server abort it
            handle.finish(aborted=True, then=self._on_finished)
        except httpx.HTTPError as exc:
            reason = self._failed(exc)
            handle.finish(error=ServerError(f"the server at {self.url} went away mid-answer ({reason}); what "
                                             "arrived is kept. Start it again, or %vllm_load another engine"))
        except Exception as exc:  # noqa: BLE001 - a malformed answer must not kill the loop
            handle.finish(error=ServerError(f"unexpected answer from the server at {self.url}: {exc}"))
        finally:
            with self._live_lock:
                self._live.pop(handle.request_id, None)

    async def _logprobs(self, choice: dict[str, Any], token_ids: list[int], body: dict[str, Any]) -> Any:
        """One choice's logprobs as :class:`TokenLogprobs` (None when the request did not ask)."""
        logprobs = choice.get("logprobs")
        if body.get("logprobs") is None or not logprobs:
            return None
        return from_openai_completion(logprobs, token_ids, body.get("logprobs"),
                                      await self._token_texts(openai_ids(logprobs)))

    async def _token_texts(self, ids: set[int]) -> dict[int, str]:
        """Each token id's text: from the model's tokenizer here when this process renders prompts
        itself, else from the server (``/detokenize``, once per id: the texts are kept)."""
        texts = self._texts
        missing = [tid for tid in ids if tid not in texts]
        if missing:
            local = self._local if isinstance(self._local, PromptRenderer) else None
            if local is not None:
                for tid in missing:
                    texts[tid] = local.tokenizer.decode([tid], clean_up_tokenization_spaces=False)
            else:
                found = await asyncio.gather(*(self._detokenize([tid]) for tid in missing))
                texts.update(zip(missing, found))
        return {tid: texts[tid] for tid in ids}

    def abort(self, request_ids: list[str]) -> None:
        cancel, alone = [], []
        with self._live_lock:
            for request_id in request_ids:
                future = self._live.get(request_id)
                if future is None:
                    continue
                sharing = self._sharing.get(request_id)
                if sharing is not None and not sharing <= set(request_ids):
                    # Others in its HTTP request go on: this one ends here, its answer is dropped.
                    sharing.discard(request_id)
                    self._live.pop(request_id, None)
                    self._sharing.pop(request_id, None)
                    alone.append(self._batched.pop(request_id))
                elif future not in cancel:
                    cancel.append(future)
        for handle in alone:
            handle.finish(aborted=True, then=self._on_finished)
        for future in cancel:
            future.cancel()  # the task gets CancelledError, its connection closes, the server aborts
        for future in cancel:  # returns once the streams are closed
            try:
                self._loop.run(_settled(future), timeout=5)
            except Exception:  # noqa: BLE001 - a stream that takes longer to close still closes
                pass

    def abort_all(self) -> int:
        with self._live_lock:
            ids = list(self._live)
        self.abort(ids)
        return len(ids)

    @property
    def live_count(self) -> int:
        return len(self._live)

    # ----- health and memory -----------------------------------------------------------------------
    def _failed(self, exc: BaseException) -> str:
        self._failure = _network_reason(exc)
        return self._failure

    def death(self) -> str | None:
        """None while the server serves; after a network failure, asks ``/health`` again (a server
        that came back is used again). A persisted engine whose process ended is dead at once."""
        if self.persisted is not None and not self.persisted.alive:
            return f"its process (pid {self.persisted.pid}) has ended"
        if self._failure is None:
            return None
        try:
            response = self._loop.run(self._loop.client.get("/health", timeout=2.0), timeout=5)
        except Exception:  # noqa: BLE001 - still unreachable
            return f"the server at {self.url} does not answer ({self._failure})"
        if response.status_code == 200:
            self._failure = None
            return None
        return f"the server at {self.url} is unhealthy (HTTP {response.status_code})"

    def died_message(self, reason: str) -> str:
        if self.persisted is not None:
            return (f"the persisted engine of {self.config.short_name} has ended ({reason}); %vllm_load "
                    "--persist starts a new one")
        return f"{reason}; start it again, or run %vllm_load --remote URL (or %vllm_load MODEL)"

    def memory(self) -> tuple[int | None, str]:
        engine = self.persisted
        if engine is None:
            return None, "on the server"
        pids = [p.pid for p in engine.processes()]
        if self.config.platform == "cuda":
            return gpu_memory_of(pids), "GPU memory of the persisted engine's processes"
        return self.host_memory(), "RSS of the persisted engine's processes"

    def host_memory(self) -> int | None:
        if self.persisted is None:
            return None
        total = 0
        for proc in self.persisted.processes():
            try:
                total += proc.memory_info().rss
            except Exception:  # noqa: BLE001 - it exited meanwhile
                pass
        return total or None

    # ----- sleep mode (a persisted GPU engine: its server's sleep routes) ------------------------------
    def sleep_refusal(self, level: int) -> str | None:
        if self.persisted is None:
            return super().sleep_refusal(level)
        if level not in (1, 2):
            return f"the sleep level is 1 (weights to host RAM) or 2 (weights discarded), not {level}"
        if self.config.platform != "cuda":
            return f"sleep mode needs an NVIDIA GPU (vLLM's sleep mode), and this engine runs on {self.config.platform}"
        if not self.persisted.sleep_routes:
            return ("this persisted engine was started without sleep mode (or on loopback, where its sleep routes "
                    "stay closed): %vllm_unload --stop frees its memory")
        if level == 2 and self.config.engine_kwargs.get("load_format") == "dummy":
            return ("level 2 discards the weights, and dummy weights (--load-format dummy) cannot be loaded "
                    "again: use level 1")
        return None

    def weight_bytes(self) -> int | None:
        if self.persisted is None:
            return None
        from ..gpu_memory import estimate_weight_bytes

        return estimate_weight_bytes(self.config.files, self.config.engine_kwargs.get("load_format"), self.dtype)

    def sleep(self, level: int = 1) -> SleepReport:
        reason = self.sleep_refusal(level)
        if reason is not None:
            raise SleepError(reason)
        if self.asleep is not None:
            if self.asleep.level >= level:
                return self.asleep
            self.wake()
        from ..gpu_memory import device_memory_used

        self.abort_all()
        before = device_memory_used("cuda")
        t0 = time.perf_counter()
        self._route("/sleep", {"level": level})
        seconds = time.perf_counter() - t0
        self.asleep = SleepReport(self.config.model, level, seconds, before, device_memory_used("cuda"),
                                  time.monotonic())
        return self.asleep

    def wake(self) -> float:
        if self.asleep is None:
            return 0.0
        t0 = time.perf_counter()
        if self.asleep.level == 2:  # weights first, read again, then the KV cache (vLLM's recipe)
            self._route("/wake_up", {"tags": "weights"})
            self._route("/collective_rpc", None, body={"method": "reload_weights"})
            self._route("/wake_up", {"tags": "kv_cache"})
        else:
            self._route("/wake_up", {})
        self.asleep = None
        return time.perf_counter() - t0

    def _sync_sleep(self) -> None:
        """A persisted engine another kernel put to sleep is woken by this one's attach."""
        if self.persisted is None or not self.persisted.sleep_routes:
            return
        response = self._loop.run(self._loop.client.get("/is_sleeping"), timeout=CONNECT_TIMEOUT)
        if response.status_code == 200 and response.json().get("is_sleeping"):
            self._route("/wake_up", {})

    def _route(self, path: str, params: dict[str, Any] | None, body: dict[str, Any] | None = None) -> None:
        response = self._loop.run(self._loop.client.post(path, params=params, json=body, timeout=None))
        if response.status_code != 200:
            raise SleepError(f"the persisted engine refused {path}: {error_text(response)}")

    def derived_args(self) -> dict[str, Any]:
        return {"max_model_len": self.max_model_len}

    def shutdown(self, baseline: Any = "own") -> UnloadReport:
        """Disconnect: running requests are aborted; the server keeps running (nothing to wait for).
        A persisted engine loses this kernel's lease (it ends after its idle timeout unattached)."""
        try:
            self.abort_all()
        finally:
            self._loop.close()
            if self.persisted is not None:
                self.persisted.release()
        return UnloadReport(self.config.model, 0, 0, None, None)


# ----- HTTP helpers -----------------------------------------------------------------------------------

async def _post(client: Any, path: str, body: dict[str, Any], *, url: str = "",
                on_failure: Callable[[BaseException], str] | None = None) -> Any:
    import httpx

    try:
        return await client.post(path, json=body)
    except httpx.HTTPError as exc:
        reason = on_failure(exc) if on_failure is not None else _network_reason(exc)
        raise ServerError(f"the server at {url or client.base_url} does not answer ({reason})") from None


async def _get_json(client: Any, path: str, url: str, api_key: str | None) -> Any:
    import httpx

    try:
        response = await client.get(path)
    except httpx.HTTPError as exc:
        raise unreachable(url, exc) from None
    return answer_json(response, path, url, api_key)


def server_key(api_key: str | None) -> str | None:
    """The API key to send: the one given, else ``$VLLM_API_KEY`` (the variable ``vllm serve``
    reads), else none."""
    return api_key or os.environ.get("VLLM_API_KEY") or None


def unreachable(url: str, exc: BaseException) -> ServerError:
    """The one-line error for a server that does not answer at all."""
    reason = _network_reason(exc)
    hint = " (%vllm_serve starts one in this kernel)" if "refused" in reason else ""
    return ServerError(f"could not reach a vLLM server at {url}: {reason}. Is it running, and is the URL "
                       f"right?{hint}")


def answer_json(response: Any, path: str, url: str, api_key: str | None) -> Any:
    """The JSON of a server's answer to a short call, or :class:`ServerError` in one line: a key
    wanted or refused, a route missing (not a vLLM server), an error, an answer that is not JSON."""
    if response.status_code == 401:
        if api_key:
            raise ServerError(f"the server at {url} refused the API key (HTTP 401): pass the key it was started "
                              "with as --api-key")
        raise ServerError(f"the server at {url} wants an API key (HTTP 401): pass it as --api-key KEY")
    if response.status_code == 404:
        raise ServerError(f"{url} answered 404 for {path}: not an OpenAI-compatible vLLM server at that address")
    if response.status_code != 200:
        raise ServerError(f"the server at {url} answered HTTP {response.status_code} for {path}: "
                          f"{error_text(response)}")
    try:
        return response.json()
    except ValueError:
        raise ServerError(f"{url} answered {path} with something that is not JSON: not a vLLM server") from None


def _cached_tokens(answer: dict[str, Any]) -> int | None:
    """The prompt tokens served from the server's prefix cache, where its usage says (a server
    started with ``--enable-prompt-tokens-details``)."""
    usage = answer.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    return int(cached) if isinstance(cached, int) else None


async def _settled(future: "asyncio.Future[Any]") -> None:
    try:
        await asyncio.wrap_future(future)
    except BaseException:  # noqa: BLE001 - cancelled or failed: settled either way
        pass


def error_text(response: Any) -> str:
    """The message of an OpenAI-style error answer, on one line."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text.strip()[:300]}"
    error = body.get("error", body) if isinstance(body, dict) else body
    message = error.get("message", error) if isinstance(error, dict) else error
    if isinstance(body, dict) and "detail" in body and not isinstance(message, str):
        message = body["detail"]
    text = " ".join(str(message).split())
    return f"HTTP {response.status_code}: {text[:400]}"


def _network_reason(exc: BaseException) -> str:
    import httpx

    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        cause: BaseException | None = exc
        while cause is not None:  # httpx says "All connection attempts failed" for a refused connection
            if isinstance(cause, ConnectionRefusedError) or "refused" in str(cause).lower():
                return "connection refused"
            cause = cause.__cause__ or cause.__context__
        return text
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return f"connection closed: {text}"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return text
