"""The engine's configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass


class EngineConfigError(ValueError):
    pass


@dataclass(frozen=True)
class EngineConfig:
    """Sizes of the single-node engine.

    block_size: token positions per KV block. kv_cache_bytes: memory for the latent pool (bytes);
    num_kv_blocks overrides it when set. max_num_seqs: running sequences at most.
    max_num_batched_tokens: tokens computed per step (chunked prefill splits prompts to fit).
    max_model_len: prompt + output tokens at most (default: the model's max_position_embeddings).
    """

    block_size: int = 16
    kv_cache_bytes: int = 1 << 30
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    max_waiting: int = 4096

    def __post_init__(self) -> None:
        for name in ("block_size", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise EngineConfigError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise EngineConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")
