"""The paged MLA latent cache: one tensor holding every layer's blocks.

Per token and layer the cache holds only the MLA latent, `kv_dim = kv_lora_rank + qk_rope_head_dim`
values (512 normalised c_kv + 64 rotated k_pe = 576 for K2), never expanded per-head K/V.
A *block* is `block_size` consecutive token positions of one sequence, across all layers;
a *slot* is one token position inside the pool, `slot = block_id * block_size + offset`.

With an fp8 cache (`fp8=Fp8Layout(...)`, see kvcache/fp8.py) each row is the raw uint8 fp8 row
(656 bytes for K2) instead: `write` quantises, `rows`/`layer_rows` give the raw rows (what the KV
transfer ships), `dequantize` turns rows read by the attention (one tile at a time) back into values.

This module only moves data; which block belongs to which sequence is `BlockManager`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from k2serve.kvcache.fp8 import Fp8Layout

__all__ = ["KVCachePool", "KVCachePoolError"]


class KVCachePoolError(ValueError):
    """A pool was sized or addressed wrongly (budget too small, shapes or positions out of range)."""


class KVCachePool:
    """Holds `kv`: [num_layers, num_blocks, block_size, row_width] on `device` (zero-filled): rows of
    kv_dim values in `dtype`, or with `fp8` rows of fp8.row_bytes uint8 (then `dtype` is what
    `dequantize` returns by default)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        fp8: Fp8Layout | None = None,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("kv_dim", kv_dim),
        ):
            if value < 1:
                raise KVCachePoolError(f"{name} must be >= 1, got {value}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_dim = kv_dim
        if fp8 is not None and fp8.kv_dim != kv_dim:
            raise KVCachePoolError(f"fp8 layout of {fp8.kv_dim} values does not match kv_dim {kv_dim}")
        self.fp8 = fp8
        self.value_dtype = dtype
        self.row_width = kv_dim if fp8 is None else fp8.row_bytes
        store = dtype if fp8 is None else torch.uint8
        self.kv = torch.zeros(num_layers, num_blocks, block_size, self.row_width, dtype=store, device=device)

    @staticmethod
    def block_bytes(
        num_layers: int, block_size: int, kv_dim: int, dtype: torch.dtype, fp8: Fp8Layout | None = None
    ) -> int:
        """Bytes one block takes over all layers: num_layers * block_size * row bytes (kv_dim *
        itemsize, or the fp8 row's bytes)."""
        row = fp8.row_bytes if fp8 is not None else kv_dim * torch.empty((), dtype=dtype).element_size()
        return num_layers * block_size * row

    @property
    def cache_dtype(self) -> str:
        """The cache's format name: "fp8" or the torch dtype's name ("bfloat16", "float32")."""
        return "fp8" if self.fp8 is not None else str(self.kv.dtype).removeprefix("torch.")

    def dequantize(self, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows read from the pool [..., row_width] as values [..., kv_dim] in `dtype` (default: the
        pool's value dtype); without fp8 only a cast."""
        dtype = dtype or self.value_dtype
        if self.fp8 is None:
            return rows.to(dtype)
        return self.fp8.dequantize(rows, dtype)

    @classmethod
    def from_budget(
        cls,
        memory_bytes: int,
        num_layers: int,
        block_size: int,
        kv_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        fp8: Fp8Layout | None = None,
    ) -> KVCachePool:
        """The largest pool whose `kv` tensor fits in `memory_bytes` (bytes, not GiB)."""
        per_block = cls.block_bytes(num_layers, block_size, kv_dim, dtype, fp8)
        num_blocks = memory_bytes // per_block
        if num_blocks < 1:
            raise KVCachePoolError(
                f"KV cache budget of {memory_bytes} bytes holds no block: one block of {block_size} tokens "
                f"x {num_layers} layers x {kv_dim} values in {'fp8' if fp8 else dtype} needs {per_block} bytes"
            )
        return cls(num_layers, num_blocks, block_size, kv_dim, dtype, device, fp8)

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes over all layers."""
        return self.block_bytes(self.num_layers, self.block_size, self.kv_dim, self.kv.dtype, self.fp8)

    @property
    def num_slots(self) -> int:
        """Token positions the pool can hold (num_blocks * block_size)."""
        return self.num_blocks * self.block_size

    def slot_mapping(self, block_table: Sequence[int] | torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Flat slot indices (LongTensor [end - start] on the pool's device) of positions [start, end).

        Position p of the sequence lives in block `block_table[p // block_size]` at offset
        `p % block_size`; the table must cover position end - 1.
        """
        if not 0 <= start <= end <= len(block_table) * self.block_size:
            raise KVCachePoolError(
                f"positions [{start}, {end}) are outside a block table of {len(block_table)} blocks "
                f"x {self.block_size} tokens"
            )
        first = start // self.block_size  # only the blocks [start, end) touches (a decode row: one)
        used = block_table[first : -(-end // self.block_size)]
        table = torch.as_tensor(used, dtype=torch.long, device=self.kv.device)
        positions = torch.arange(start, end, device=self.kv.device)  # [T]
        return table[positions // self.block_size - first] * self.block_size + positions % self.block_size

    def contiguous_start(self, block_table: Sequence[int], num_tokens: int) -> int | None:
        """The first slot of positions [0, num_tokens) when they occupy consecutive slots (the
        table's blocks covering them are consecutive ids), else None."""
        needed = -(-num_tokens // self.block_size)
        if not 0 < needed <= len(block_table):
            raise KVCachePoolError(
                f"{num_tokens} positions need {needed} blocks, the table has {len(block_table)}"
            )
        first = block_table[0]
        if any(block_table[i] != first + i for i in range(needed)):
            return None
        return first * self.block_size

    def rows(self, layer: int, start: int, num_tokens: int) -> torch.Tensor:
        """The pool's own memory of slots [start, start + num_tokens) of `layer`: a contiguous
        [num_tokens, row_width] view of raw rows (writing it writes the cache)."""
        if not 0 <= start <= start + num_tokens <= self.num_slots:
            raise KVCachePoolError(
                f"slots [{start}, {start + num_tokens}) outside the pool's {self.num_slots}"
            )
        return self.layer_rows(layer)[start : start + num_tokens]

    def layer_rows(self, layer: int) -> torch.Tensor:
        """All slots of `layer` as one [num_slots, row_width] view of raw rows (slot-addressed reads by
        the attention, which dequantizes what it reads)."""
        return self.kv[layer].view(self.num_slots, self.row_width)

    def write(self, layer: int, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Store `values` [T, kv_dim] of `layer` at `slots` [T] (cast to the pool dtype, or quantised
        to fp8 rows)."""
        if values.dim() != 2 or values.shape[1] != self.kv_dim or values.shape[0] != slots.numel():
            raise KVCachePoolError(
                f"values of shape {tuple(values.shape)} do not match {slots.numel()} slots x kv_dim {self.kv_dim}"
            )
        rows = values.to(self.kv.device, self.kv.dtype) if self.fp8 is None else self.fp8.quantize(values)
        self.write_rows(layer, slots, rows)

    def write_rows(self, layer: int, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Store raw rows [T, row_width] in the pool's storage dtype (as `rows` reads them: KV received
        from another engine with the same cache format) at `slots` [T]."""
        if tuple(rows.shape) != (slots.numel(), self.row_width) or rows.dtype != self.kv.dtype:
            raise KVCachePoolError(
                f"rows {tuple(rows.shape)} {rows.dtype} do not match {slots.numel()} slots x "
                f"{self.row_width} {self.kv.dtype} ({self.cache_dtype} cache)"
            )
        self.layer_rows(layer).index_copy_(0, slots.to(self.kv.device), rows.to(self.kv.device))

    def gather(self, layer: int, block_tables: torch.Tensor) -> torch.Tensor:
        """The cache of `layer` for a batch of sequences, as [B, max_blocks * block_size, kv_dim] values
        (dequantized from an fp8 cache).

        `block_tables` is a LongTensor [B, max_blocks]; rows shorter than max_blocks are padded
        with -1. Row b's position p is gathered from block `block_tables[b, p // block_size]`;
        positions in padding blocks (and past each sequence's length) hold arbitrary data that the
        caller masks by sequence length.
        """
        if block_tables.dim() != 2:
            raise KVCachePoolError(
                f"block_tables must be [B, max_blocks], got shape {tuple(block_tables.shape)}"
            )
        batch, max_blocks = block_tables.shape
        ids = block_tables.to(self.kv.device, torch.long).clamp_min(0).reshape(-1)  # [B * M]
        blocks = self.kv[layer].index_select(0, ids)  # [B * M, block_size, W]
        rows = blocks.view(batch, max_blocks * self.block_size, self.row_width)
        return rows if self.fp8 is None else self.dequantize(rows)
