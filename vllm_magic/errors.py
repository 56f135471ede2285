"""The package's errors: every one a :class:`VllmMagicError` with a message meant for the user.

The core (engine session, LangChain classes, widgets) raises these; only the magics turn them into
IPython's ``UsageError``. IPython and Jupyter show any of them raised in a cell (``llm.invoke(...)``
included) as one line, as they show a ``UsageError``: the message is meant for the user, the
traceback is not. None of them is a ``ValueError``: pydantic would bury one raised while a LangChain
object is constructed under a ``ValidationError``.
"""

from __future__ import annotations

__all__ = ["VllmMagicError", "ConfigError", "NoEngineError", "NoEmbedderError", "EngineStartError", "EngineDiedError",
           "PromptTooLongError", "RequestError", "ServerError", "SleepError"]


class VllmMagicError(Exception):
    """Base of every error vllm-magic reports to its user."""

    def _render_traceback_(self) -> list[str]:
        # IPython's hook for exceptions that render themselves (ipyparallel uses it too).
        return [f"{type(self).__name__}: {self}"]


class ConfigError(VllmMagicError):
    """The engine configuration is invalid; found before any engine was touched."""


class NoEngineError(VllmMagicError, RuntimeError):
    """No engine is loaded."""


class NoEmbedderError(NoEngineError):
    """No embedding engine is loaded (``%vllm_load --embed``, ``session.load_embedder()``)."""


class EngineStartError(VllmMagicError, RuntimeError):
    """The engine failed to start; the message carries vLLM's root cause in a few lines."""


class EngineDiedError(VllmMagicError, RuntimeError):
    """The engine stopped serving (its process died, or it was shut down)."""


class PromptTooLongError(VllmMagicError):
    """A prompt does not fit the model's context window."""


class RequestError(VllmMagicError):
    """A request cannot be made as asked: unknown options, unsupported messages, bad values."""


class ServerError(VllmMagicError, RuntimeError):
    """A vLLM server could not be reached or started, refused the connection, or went away."""


class SleepError(VllmMagicError, RuntimeError):
    """The engine cannot sleep or wake as asked (no GPU, no sleep mode, weights that cannot be reloaded)."""
