"""The notebook's widgets: the sampling panel (``%vllm_controls``) and the playground
(``%vllm_playground``), both bound to the session's one set of sampling defaults."""

from .panel import SLIDERS, SamplingPanel, changed_settings, decode_stop, encode_stop, parse_seed
from .playground import Playground, PlaygroundRun

__all__ = ["SamplingPanel", "Playground", "PlaygroundRun", "SLIDERS", "encode_stop", "decode_stop", "parse_seed",
           "changed_settings"]
