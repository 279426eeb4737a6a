"""What a worker that moves KV between engines asks of one: the shape of its latent KV, and blocks
reserved for a prompt computed elsewhere together with where each layer of it lands.

A decode worker reserves blocks for a prompt (`LLMEngine.reserve_kv`), receives each layer's latent
[num_tokens, kv_dim] into them (`KVReservation.write`, or straight into `rows(layer)` when the blocks
are consecutive), then hands the block table to the engine with the request (`Prefilled`) or frees
it (`LLMEngine.free_kv`). A prefill worker reads the geometry to tell the receiver what comes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from k2serve.kvcache.pool import KVCachePool


@dataclass(frozen=True)
class KVGeometry:
    """One engine's latent KV as its pool stores it: `num_layers` layers of rows of `kv_dim` elements
    of `dtype` per token (576 values for K2: the 512-value compressed KV and the 64-value RoPE key;
    with an fp8 cache the 656 raw uint8 bytes of kvcache/fp8.py), paged in blocks of `block_size`
    tokens; `cache_dtype` names the format ("bfloat16", "float32", "fp8"). A sender and a receiver
    of KV must agree on all but `block_size` (the transfer ships the rows as they are)."""

    num_layers: int
    kv_dim: int
    block_size: int
    dtype: torch.dtype
    cache_dtype: str = ""

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token's latent over all layers."""
        return self.num_layers * self.kv_dim * self.dtype.itemsize


class KVReservation:
    """Blocks reserved in an engine's pool for the first `num_tokens` positions of a prompt whose KV is
    computed elsewhere. Writing may happen on any thread (no step reads these blocks until the engine
    adopts them); the caller owns `block_table` until it hands it to the engine or frees it."""

    def __init__(self, pool: KVCachePool, block_table: list[int], num_tokens: int) -> None:
        self.block_table = block_table
        self.num_tokens = num_tokens
        self._pool = pool
        self._slots = pool.slot_mapping(block_table, 0, num_tokens)  # [num_tokens]
        self._start = pool.contiguous_start(block_table, num_tokens)

    @property
    def contiguous(self) -> bool:
        """Whether the positions occupy consecutive slots: then `rows` views each layer's span."""
        return self._start is not None

    def write(self, layer: int, kv: torch.Tensor) -> None:
        """Store `layer`'s rows of the prompt as another engine's pool holds them, kv [num_tokens,
        row_width] in the pool's storage dtype (the geometry's kv_dim and dtype)."""
        self._pool.write_rows(layer, self._slots, kv)

    def rows(self, layer: int) -> torch.Tensor:
        """The pool's own memory of `layer` for these positions, [num_tokens, row_width] (writing it writes
        the cache); only when `contiguous`."""
        if self._start is None:
            raise ValueError(f"the blocks {self.block_table} are not consecutive: write() layers instead")
        return self._pool.rows(layer, self._start, self.num_tokens)
