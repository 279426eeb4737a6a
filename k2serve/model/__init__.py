"""The K2 model: config-driven layers (RMSNorm, YaRN RoPE, MLA, MoE), checkpoint loading and writing."""
