"""The engine core: one session per kernel over a backend that runs the model.

``session`` (lifecycle, the one request path, status), ``backend`` (the seam) and ``local`` (the
in-process vLLM engine: ``driver``, ``processes``, ``log``), ``config`` (engine arguments and the
"already loaded" rule), ``sampling`` (defaults and ``SamplingParams``), ``prompts`` (templates,
tokens, context), ``handles`` (what a request gives back), ``compat`` (vLLM 0.26-0.33).
"""

from .requests.handles import Completion, GenerationResult, RequestHandle
from .requests.sampling import SamplingDefaults
from .session import EngineSession, LoadInfo, SessionStatus, UnloadReport, get_session

__all__ = ["EngineSession", "get_session", "LoadInfo", "SessionStatus", "UnloadReport", "SamplingDefaults",
           "RequestHandle", "GenerationResult", "Completion"]
