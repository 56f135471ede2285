"""LangChain's own standard test suites for ``VLLMEmbeddings``, against the demo model pooled into
embeddings beside the suite's generation engine."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests

from vllm_magic.langchain import VLLMEmbeddings


@pytest.fixture(scope="module")
def _embedder(engine):
    """Constructing VLLMEmbeddings loads the session's embedder: once for the module, freed after it."""
    yield engine
    engine.unload_embedder()


class _VLLMEmbeddingsParams:
    @pytest.fixture(autouse=True)
    def _live_embedder(self, _embedder):
        return _embedder

    @property
    def embeddings_class(self) -> type[VLLMEmbeddings]:
        return VLLMEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model": "SmolLM2-135M-Instruct"}


class TestVLLMEmbeddingsUnit(_VLLMEmbeddingsParams, EmbeddingsUnitTests):
    pass


class TestVLLMEmbeddingsIntegration(_VLLMEmbeddingsParams, EmbeddingsIntegrationTests):
    pass


def test_the_standard_suites_ran_on_the_sessions_embedder(_embedder):
    model = VLLMEmbeddings(model="SmolLM2-135M-Instruct")
    assert _embedder.embedder is not None and _embedder.embedder.dimension == len(model.embed_query("foo")) == 576
