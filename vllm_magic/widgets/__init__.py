"""The notebook's widgets: the sampling panel (``%vllm_controls``) and the playground
(``%vllm_playground``), both bound to the session's one set of sampling defaults, and the token
explorer (``%%vllm --explore``, ``result.explore()``)."""

from .panel import SLIDERS, SamplingPanel, changed_settings, decode_stop, encode_stop, parse_seed
from .explorer import TokenExplorer
from .playground import Playground, PlaygroundRun

__all__ = ["SamplingPanel", "Playground", "PlaygroundRun", "TokenExplorer", "SLIDERS", "encode_stop", "decode_stop", "parse_seed",
           "changed_settings"]
