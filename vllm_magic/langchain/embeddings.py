"""``VLLMEmbeddings``: the session's embedding engine as LangChain ``Embeddings``.

LangChain has no vLLM embeddings class; this one follows ``VLLM`` and ``ChatVLLM``: it owns no
engine. Constructing it attaches to the session's embedding engine when that serves its request
(the session's one rule, as for ``%vllm_load --embed``) and loads the request through the session
otherwise (replacing the embedder loaded before; the generation engine is never touched). With
``base_url`` it uses a vLLM server's ``/v1/embeddings`` instead.

>>> from vllm_magic.langchain import VLLMEmbeddings
>>> embeddings = VLLMEmbeddings()  # the demo model, pooled into embeddings  # doctest: +SKIP
>>> embeddings.embed_query("What is the capital of France?")[:3]  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from ..demo.model import DEMO_MODEL_NAME
from ..engine.session import EngineSession, get_session
from ..errors import RequestError

__all__ = ["VLLMEmbeddings"]

#: Names under which the demo model can be asked for (besides ``None``).
_DEMO_NAMES = frozenset({DEMO_MODEL_NAME, f"HuggingFaceTB/{DEMO_MODEL_NAME}", ""})


class VLLMEmbeddings(BaseModel, Embeddings):
    """Embeddings from the kernel's vLLM embedding engine (``%vllm_load --embed``).

    Texts longer than the model's context are truncated to it, not refused. ``embed_documents``
    sends its texts together (vLLM batches them); the async methods wait in a worker thread, so the
    event loop goes on meanwhile.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model: str | None = None
    """Model name or path (any model vLLM pools into embeddings); None or the demo model's name
    (``SmolLM2-135M-Instruct``) is the demo model. With ``base_url``: which of the server's models
    (None: the first)."""
    vllm_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further vLLM engine arguments (``max_model_len``, ``dtype``, ...). Values that differ from the
    live embedder's make another embedder, which replaces it."""
    base_url: str | None = None
    """A vLLM server serving embeddings (``vllm serve MODEL --runner pooling``), e.g.
    ``http://gpu-box:8001`` or its OpenAI ``base_url`` (``.../v1``); None: an engine in this kernel."""
    api_key: str | None = Field(default=None, repr=False)
    """The server's API key (None: ``$VLLM_API_KEY`` when set)."""
    session: Any = Field(default=None, exclude=True)
    """The engine session to use; the kernel's (``vllm_magic.get_session()``) when None."""
    document_template: str = "{text}"
    """How a document is put to the model before it is embedded (``{text}`` is the document): many
    embedding models want an instruction or a prefix (e5's ``"passage: {text}"``). The vector store
    keeps the document itself."""
    query_template: str = "{text}"
    """The same for a query (e5's ``"query: {text}"``; BGE's instruction)."""

    _wanted: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _attach_embedder(self) -> "VLLMEmbeddings":
        # As the LLM classes do: constructing the object makes its engine ready.
        if self.base_url is not None and self.vllm_kwargs:
            raise RequestError("vllm_kwargs shape an engine started here; a server (base_url) embeds with the "
                               "arguments it was started with")
        if "model" in self.vllm_kwargs:
            raise RequestError("give the model as model=..., not inside vllm_kwargs")
        for name in ("document_template", "query_template"):
            if "{text}" not in getattr(self, name):
                raise RequestError(f"{name} holds {{text}} where the text goes, e.g. 'query: {{text}}'")
        self._ensure_embedder(load=True)
        return self

    @property
    def engine_session(self) -> EngineSession:
        return self.session if self.session is not None else get_session()

    @property
    def _model(self) -> str | None:
        return None if self.base_url is None and self.model in _DEMO_NAMES else self.model

    def _serves(self, session: EngineSession) -> bool:
        embedder = session.embedder
        if embedder is None:
            return False
        if self.base_url is not None:
            return embedder.attached_to(self.base_url, self.api_key, self.model)
        if self._wanted is None:
            self._wanted = session.resolve_embedder(self._model, **self.vllm_kwargs)
        return embedder.serves(self._wanted)

    def _ensure_embedder(self, *, load: bool) -> EngineSession:
        """Attach to the session's embedder when it serves this object, else load its request.

        At call time (``load=False``) another embedder loaded since is a mistake to report, not a
        reason to replace what the user loaded; after an unload the request is loaded again."""
        session = self.engine_session
        if self._serves(session):
            return session
        live = session.embedder
        if live is not None and not load:
            raise RequestError(f"VLLMEmbeddings was built for {self.model or DEMO_MODEL_NAME} but the embedding "
                               f"engine is now {live.config.short_name} with other arguments; build a new "
                               "VLLMEmbeddings to use it")
        if self.base_url is not None:
            session.load_embedder(self.model, url=self.base_url, api_key=self.api_key)
        else:
            session.load_embedder(self._model, **self.vllm_kwargs)
        return session

    # ----- LangChain's Embeddings --------------------------------------------------------------
    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, in order, in one request to the engine."""
        return self._ensure_embedder(load=False).embed([self._put(self.document_template, t) for t in texts])

    def embed_query(self, text: str) -> list[float]:
        """The vector of one text."""
        return self._ensure_embedder(load=False).embed([self._put(self.query_template, text)])[0]

    @staticmethod
    def _put(template: str, text: str) -> str:
        return text if template == "{text}" else template.replace("{text}", text)

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """:meth:`embed_documents`, waited for in a worker thread (the event loop is not blocked)."""
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        """:meth:`embed_query`, waited for in a worker thread (the event loop is not blocked)."""
        return await asyncio.to_thread(self.embed_query, text)
