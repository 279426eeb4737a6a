"""The K2 model: config-driven layers (RMSNorm, YaRN RoPE, MLA, MoE), checkpoint loading and writing."""

from k2serve.model.loader import CheckpointError, load_model
from k2serve.model.model import K2Model

__all__ = ["CheckpointError", "K2Model", "load_model"]
