"""The engine's configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from k2serve.kvcache.fp8 import CACHE_DTYPES
from k2serve.model.triton_attention import ATTENTION_BACKENDS

DEFAULT_KV_CACHE_BYTES = 1 << 30  # the pool when neither kv_cache_bytes nor memory_budget_bytes is given


class EngineConfigError(ValueError):
    pass


@dataclass(frozen=True)
class EngineConfig:
    """Sizes of the single-node engine.

    block_size: token positions per KV block. The latent pool is sized by one of: num_kv_blocks;
    kv_cache_bytes (bytes; default DEFAULT_KV_CACHE_BYTES); memory_budget_bytes, the memory of this
    rank for weights + activations + KV: the pool gets what is left after the loaded weights and a
    profiled activation peak (engine/kv_sizing.py). max_num_seqs: running sequences at most.
    max_num_batched_tokens: tokens computed per step (chunked prefill splits prompts to fit).
    kv_cache_dtype: what the pool stores, one of CACHE_DTYPES: "auto" (the model's dtype), "bf16",
    "fp32", or "fp8" (e4m3 c_kv with a per-token scale + bf16 RoPE keys, kvcache/fp8.py).
    attention_backend: one of ATTENTION_BACKENDS: "torch" (the tiled reference) or "triton" (the paged
    attention's work items through the Triton kernels, model/triton_attention.py: needs CUDA or
    TRITON_INTERPRET=1, checked when the engine is built; an fp8 pool stays torch).
    kv_offload_host_bytes / kv_offload_dir / kv_offload_disk_bytes: the local tiers below the pool
    (kvcache/tiers.py): evicted prefix-cache blocks go to a host-memory LRU of that many bytes, blocks
    pushed out of it to one checksummed file per block in kv_offload_dir (at most kv_offload_disk_bytes),
    and a prefix hit there is reloaded instead of recomputed. 0 / None: no such tier.
    kv_session_lease_s: after a turn of a request with a session_id finishes, its blocks stay
    referenced (not evictable) until this many seconds pass or the session's next turn arrives
    (an agent's tool call between turns); 0 disables leases.
    max_model_len: prompt + output tokens at most (default: the model's max_position_embeddings, or
    less when a pool sized by bytes or blocks holds less). Startup refuses a pool that cannot hold one
    max_model_len sequence.
    """

    block_size: int = 16
    kv_cache_bytes: int | None = None
    num_kv_blocks: int | None = None
    memory_budget_bytes: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    max_waiting: int = 4096
    kv_cache_dtype: str = "auto"
    attention_backend: str = "torch"
    kv_offload_host_bytes: int = 0
    kv_offload_dir: str | None = None
    kv_offload_disk_bytes: int = 0
    kv_session_lease_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("kv_cache_bytes", "num_kv_blocks", "memory_budget_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EngineConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        given = [n for n in ("kv_cache_bytes", "num_kv_blocks", "memory_budget_bytes") if getattr(self, n)]
        if len(given) > 1:
            raise EngineConfigError(
                f"give one of kv_cache_bytes, num_kv_blocks, memory_budget_bytes, got {given}"
            )
        if self.kv_cache_dtype not in CACHE_DTYPES:
            raise EngineConfigError(
                f"kv_cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise EngineConfigError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )
        for name in ("kv_offload_host_bytes", "kv_offload_disk_bytes", "kv_session_lease_s"):
            if getattr(self, name) < 0:
                raise EngineConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.kv_offload_disk_bytes and not self.kv_offload_dir:
            raise EngineConfigError("kv_offload_disk_bytes needs kv_offload_dir (the disk tier's directory)")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise EngineConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")
