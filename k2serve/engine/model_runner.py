"""Runs one scheduled step of the model over the paged MLA latent cache.

All scheduled tokens of the step are flattened into one ragged batch [T]. Each layer writes the
new tokens' latent into the pool, then attends with the tiled online-softmax algorithm of
`model/attention.py`, reading each sequence's keys through its own block table one tile at a time:

- decode rows (one token each) form one batch of split-K work items: each row's context is cut into
  splits of at most `split_tokens` keys (so no row is padded to the batch's longest context), the
  splits are attended in one pass and merged by log-sum-exp;
- each prefill chunk is its own work item over its whole context, tile by tile (extra memory
  O(chunk x tile x heads)).
Each work group takes the expanded or the weight-absorbed path, whichever costs fewer FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from functools import partial

import torch

from k2serve.config import ModelConfig
from k2serve.kvcache.pool import KVCachePool
from k2serve.model.attention import (
    DEFAULT_TILES,
    PAD_KEY_POS,
    TileConfig,
    absorbed_is_cheaper,
    attend_absorbed,
    attend_expanded,
    merge_partials,
    paged_tiles,
)
from k2serve.model.mla import MLA
from k2serve.model.model import K2Model
from k2serve.model.shapes import bucket


@dataclass
class AttentionWork:
    """Work items attended the same way; item n is query rows of one sequence over a range of its keys."""

    absorbed: bool
    token: torch.Tensor  # [N, Q] long: flat step index of each query, -1 for padding
    q_pos: torch.Tensor  # [N, Q] long: absolute positions of the queries, -1 for padding
    key_slots: torch.Tensor  # [N, K] long: pool slots of the item's keys (padding: slot 0)
    key_pos: torch.Tensor  # [N, K] long: their positions (padding: PAD_KEY_POS)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] flat pool slots of the new tokens
    work: list[AttentionWork]
    sample_index: torch.Tensor  # [S] flat index of the last token of each sampling row


@dataclass(frozen=True)
class RowSpec:
    """One sequence's part of a step: compute `token_ids` at positions start.. with `block_table`."""

    token_ids: Seq[int]
    start: int
    block_table: Seq[int]
    sample: bool


LayerHook = Callable[[int], None]
"""Called with a layer index right after that layer's new latent is in the pool (before its attention)."""


class PagedBackend:
    """The attention backend the model calls in each layer during an engine step."""

    def __init__(
        self, pool: KVCachePool, inputs: StepInputs, tiles: TileConfig, on_layer: LayerHook | None = None
    ) -> None:
        self.pool = pool
        self.inputs = inputs
        self.tiles = tiles
        self.on_layer = on_layer

    def __call__(
        self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor
    ) -> torch.Tensor:
        layer = mla.layer_idx
        self.pool.write(layer, self.inputs.slots, latent)
        if self.on_layer is not None:
            self.on_layer(layer)
        rows = self.pool.layer_rows(layer)  # [S, C + dr], or raw fp8 rows [S, W]
        dequantize = None if self.pool.fp8 is None else partial(self.pool.dequantize, dtype=q_nope.dtype)
        out = q_nope.new_zeros(q_nope.shape[0], mla.n_heads, mla.v_dim)  # [T, H, dv] (padding rows stay 0)
        for w in self.inputs.work:
            index = w.token.clamp_min(0)
            tiles = paged_tiles(rows, w.key_slots, w.key_pos, self.tiles.tile_tokens, dequantize)
            if w.absorbed:
                w_uk, w_uv = mla.absorb_weights()
                q_lat = torch.einsum("nqhd,hdc->nqhc", q_nope[index], w_uk)  # [N, Q, H, C]
                part = attend_absorbed(q_lat, q_pe[index], w.q_pos, tiles, mla.softmax_scale)
            else:
                part = attend_expanded(
                    q_nope[index],
                    q_pe[index],
                    w.q_pos,
                    tiles,
                    mla.kv_b_proj.weight,
                    mla.v_dim,
                    mla.softmax_scale,
                )
            merged = merge_partials(part, w.token, out.shape[0]).to(out.dtype)  # [T, H, C or dv]
            if w.absorbed:
                merged = torch.einsum("thc,hdc->thd", merged, w_uv)
            queries = w.token[w.token >= 0]
            out[queries] = merged[queries]
        return out


def _absorbed(config: ModelConfig, num_queries: int, num_keys: int) -> bool:
    c = config
    return absorbed_is_cheaper(
        num_queries, num_keys, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    )


def _decode_work(
    rows: list[tuple[RowSpec, int]], pool: KVCachePool, config: ModelConfig, tiles: TileConfig
) -> AttentionWork:
    """rows: (spec, flat index of its token). Each row's context [0, start + 1) in splits of width S."""
    width = min(tiles.split_tokens, max(r.start + 1 for r, _ in rows))
    tokens: list[int] = []
    q_pos: list[int] = []
    key_slots: list[torch.Tensor] = []
    key_pos: list[torch.Tensor] = []
    for r, offset in rows:
        length = r.start + 1
        splits = -(-length // width)
        mapping = pool.slot_mapping(r.block_table, 0, length)  # [L]
        slots = mapping.new_zeros(splits * width)
        slots[:length] = mapping
        positions = torch.full((splits * width,), PAD_KEY_POS, dtype=torch.long)
        positions[:length] = torch.arange(length)
        key_slots.append(slots.view(splits, width))
        key_pos.append(positions.view(splits, width))
        tokens.extend([offset] * splits)
        q_pos.extend([r.start] * splits)
    return AttentionWork(
        absorbed=_absorbed(config, 1, width),
        token=torch.tensor(tokens, dtype=torch.long)[:, None],
        q_pos=torch.tensor(q_pos, dtype=torch.long)[:, None],
        key_slots=torch.cat(key_slots),
        key_pos=torch.cat(key_pos),
    )


def _prefill_work(r: RowSpec, offset: int, pool: KVCachePool, config: ModelConfig) -> AttentionWork:
    """One chunk: its n queries at positions start.. over the keys [0, start + n)."""
    n = len(r.token_ids)
    length = r.start + n
    return AttentionWork(
        absorbed=_absorbed(config, n, length),
        token=(offset + torch.arange(n))[None, :],
        q_pos=(r.start + torch.arange(n))[None, :],
        key_slots=pool.slot_mapping(r.block_table, 0, length)[None, :],
        key_pos=torch.arange(length)[None, :],
    )


def build_step_inputs(
    rows: Seq[RowSpec],
    pool: KVCachePool,
    config: ModelConfig,
    tiles: TileConfig = DEFAULT_TILES,
    pad_slot: int | None = None,
) -> StepInputs:
    """Flatten the rows into one ragged batch and cut its attention into work items. With `pad_slot`, the batch is padded to a row bucket with
    dummy tokens whose latent goes to that scratch slot and which no row attends to."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[torch.Tensor] = []
    sample_index: list[int] = []
    decode_rows: list[tuple[RowSpec, int]] = []
    prefill_rows: list[tuple[RowSpec, int]] = []
    for r in rows:
        offset = len(ids)
        n = len(r.token_ids)
        ids.extend(r.token_ids)
        positions.extend(range(r.start, r.start + n))
        slots.append(pool.slot_mapping(r.block_table, r.start, r.start + n))
        (decode_rows if n == 1 else prefill_rows).append((r, offset))
        if r.sample:
            sample_index.append(offset + n - 1)
    work = [_prefill_work(r, offset, pool, config) for r, offset in prefill_rows]
    if decode_rows:
        work.append(_decode_work(decode_rows, pool, config, tiles))
    if pad_slot is not None and bucket(len(ids)) > len(ids):
        pad = bucket(len(ids)) - len(ids)
        ids.extend([0] * pad)
        positions.extend([0] * pad)
        slots.append(torch.full((pad,), pad_slot, dtype=torch.long))
    return StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        slots=torch.cat(slots),
        work=work,
        sample_index=torch.tensor(sample_index, dtype=torch.long),
    )


class ModelRunner:
    def __init__(
        self,
        model: K2Model,
        pool: KVCachePool,
        pad_slot: int | None = None,
        tiles: TileConfig = DEFAULT_TILES,
    ) -> None:
        """`pad_slot`: a pool slot no sequence owns; when given, steps are padded to row buckets.
        `tiles`: the attention's tile and split sizes."""
        self.model = model
        self.pool = pool
        self.pad_slot = pad_slot
        self.tiles = tiles

    @torch.inference_mode()
    def run(self, rows: Seq[RowSpec], on_layer: LayerHook | None = None) -> torch.Tensor:
        """Compute the rows' tokens into the cache; return fp32 logits [S, V] for the sampling rows."""
        inputs = build_step_inputs(rows, self.pool, self.model.config, self.tiles, self.pad_slot)
        backend = PagedBackend(self.pool, inputs, self.tiles, on_layer)
        hidden = self.model.forward_hidden(inputs.input_ids, inputs.positions, backend)
        return self.model.logits(hidden[inputs.sample_index])
