"""The engine core: one session per kernel over a backend that runs the model.

From the bottom up (a module imports only from its own layer or the ones below it):

* ``compat``: the one module that imports vLLM (lazily: importing it does not), and the names and
  calls that moved between vLLM 0.26 and 0.33; ``log`` keeps vLLM's output in the engine log file.
* ``config`` (engine arguments, the demo model when none is named, the "already loaded" rule),
  ``platform`` (CPU and NVIDIA GPU defaults, CPU threads and dtype), ``listeners`` (callbacks on
  finished requests, on a thread of their own).
* ``requests/``: ``prompts`` (templates, tokens, context), ``sampling`` (defaults and
  ``SamplingParams``), ``tool_calls``, ``reasoning`` (vLLM's parsers), ``handles`` (what a request
  gives back), ``logprobs`` (token probabilities in one form), ``grid`` (settings side by side).
* ``backends/``: ``base`` (the seam), ``local`` (the in-process vLLM engine, with ``driver`` and
  ``processes``), ``remote`` (a vLLM server over HTTP), ``server`` (``vllm serve`` owned by the
  kernel), ``cpu_int4`` (vLLM plugin: 4-bit matmuls on CPUs without vLLM's kernel).
* ``session``: lifecycle, the one request path, status; what the front-ends talk to.
* ``embeddings``: the embedding engine the session holds beside the generation engine
  (``%vllm_load --embed``): vLLM's pooling runner in this kernel, or a server's embeddings.

Directories (the cache, logs) come from :mod:`vllm_magic.paths`.
"""

from .requests.grid import Grid
from .requests.handles import Completion, GenerationResult, RequestHandle
from .requests.logprobs import TokenChoice, TokenLogprobs
from .requests.prompts import TokenPrompt
from .requests.sampling import SamplingDefaults
from .session import EngineSession, LoadInfo, SessionStatus, UnloadReport, get_session

__all__ = ["EngineSession", "get_session", "LoadInfo", "SessionStatus", "UnloadReport", "SamplingDefaults",
           "RequestHandle", "GenerationResult", "Completion", "TokenPrompt", "TokenLogprobs", "TokenChoice", "Grid"]
