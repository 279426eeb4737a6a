"""Runs one scheduled step of the model over the paged MLA latent cache.

All scheduled tokens of the step are flattened into one ragged batch [T]. Each layer writes the
new tokens' latent into the pool, then attends with the tiled online-softmax algorithm of
`model/attention.py`, reading each sequence's keys through its own block table a tile of whole blocks at a time:

- decode rows (one token each) form one batch of split-K work items: each row's context is cut into
  splits of at most `split_tokens` keys (so no row is padded to the batch's longest context), the
  splits are attended in one pass and merged by log-sum-exp;
- each prefill chunk is its own work item over its whole context, tile by tile (extra memory
  O(chunk x tile x heads)).
Each work group takes the expanded or the weight-absorbed path, whichever costs fewer FLOPs. With the
"triton" attention backend every work item (decode splits, in-place runs as block ranges, prefill
chunks, absorbed or expanded) runs the Triton kernels of `model/triton_attention.py` on the same items;
an fp8 pool stays on the torch path.
"""

from __future__ import annotations

import array
import dataclasses
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from functools import partial

import torch

from k2serve.config import ModelConfig
from k2serve.engine.captured import CapturedDecode, DecodeRow
from k2serve.kvcache.pool import KVCachePool, KVCachePoolError
from k2serve.model.attention import (
    DEFAULT_TILES,
    PAD_KEY_POS,
    KeyTile,
    Partial,
    TileConfig,
    absorbed_is_cheaper,
    attend_absorbed,
    attend_expanded,
    merge_partials,
    paged_tiles,
    run_tiles,
)
from k2serve.model.mla import MLA
from k2serve.model.model import K2Model
from k2serve.model.shapes import bucket
from k2serve.model.triton_attention import check_backend, paged_absorbed, paged_expanded


@dataclass(frozen=True)
class KeyRun:
    """`items` decode splits of one row read in place: `width` keys each, at consecutive pool slots
    from `first_slot` (positions from `first_pos`), all before the query."""

    token: int  # flat step index of the row's query
    q_pos: int
    first_slot: int
    first_pos: int
    items: int
    width: int


@dataclass
class AttentionWork:
    """Work items attended the same way; item n is query rows of one sequence over a range of its keys.
    The gathered items (token .. key_pos; N may be 0) and the `runs` are merged together per query."""

    absorbed: bool
    token: torch.Tensor  # [N, Q] long: flat step index of each query, -1 for padding
    q_pos: torch.Tensor  # [N, Q] long: absolute positions of the queries, -1 for padding
    key_blocks: torch.Tensor  # [N, B] long: pool blocks holding the item's keys (padding: block 0)
    key_pos: torch.Tensor  # [N, B * block_size] long: positions of the keys they hold (else PAD_KEY_POS)
    runs: list[KeyRun] = field(default_factory=list)

    def to(self, device: torch.device) -> AttentionWork:
        """This work's index tensors on `device` (built on the host from Python lists, then one copy)."""
        return dataclasses.replace(
            self,
            token=self.token.to(device, non_blocking=True),
            q_pos=self.q_pos.to(device, non_blocking=True),
            key_blocks=self.key_blocks.to(device, non_blocking=True),
            key_pos=self.key_pos.to(device, non_blocking=True),
        )


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] flat pool slots of the new tokens
    work: list[AttentionWork]
    sample_index: torch.Tensor  # [S] flat indices of the last `num_logits` tokens of each sampling row


@dataclass(frozen=True)
class RowSpec:
    """One sequence's part of a step: compute `token_ids` at positions start.. with `block_table`.
    A sampling row returns the logits of its last `num_logits` tokens (more than one: a speculative
    row verifying its drafts)."""

    token_ids: Seq[int]
    start: int
    block_table: Seq[int]
    sample: bool
    num_logits: int = 1


LayerHook = Callable[[int], None]
"""Called with a layer index right after that layer's new latent is in the pool (before its attention)."""


def _run_keys(r: KeyRun, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A run's items as gathered items: key_blocks [items, width / block_size] (a run is consecutive
    pool blocks from its first slot's block) and key_pos [items, width]."""
    per_item = r.width // block_size
    first = r.first_slot // block_size
    blocks = first + torch.arange(r.items * per_item, dtype=torch.long).view(r.items, per_item)
    positions = r.first_pos + torch.arange(r.items * r.width, dtype=torch.long).view(r.items, r.width)
    return blocks, positions


class PagedBackend:
    """The attention backend the model calls in each layer during an engine step. `attention_backend`:
    "torch" (the tiled reference), or "triton" (the Triton kernels; an fp8 pool stays torch)."""

    def __init__(
        self,
        pool: KVCachePool,
        inputs: StepInputs,
        tiles: TileConfig,
        on_layer: LayerHook | None = None,
        attention_backend: str = "torch",
    ) -> None:
        self.pool = pool
        self.inputs = inputs
        self.tiles = tiles
        self.on_layer = on_layer
        self.attention_backend = attention_backend

    def __call__(
        self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor
    ) -> torch.Tensor:
        layer = mla.layer_idx
        self.pool.write(layer, self.inputs.slots, latent)
        if self.on_layer is not None:
            self.on_layer(layer)
        pages = self.pool.kv[layer]  # [num_blocks, block_size, C + dr], or raw fp8 rows [..., W]
        rows = self.pool.layer_rows(layer)  # the same memory as flat slots [S, W]
        dequantize = None if self.pool.fp8 is None else partial(self.pool.dequantize, dtype=q_nope.dtype)
        tile = self.tiles.tile_tokens
        out = q_nope.new_zeros(q_nope.shape[0], mla.n_heads, mla.v_dim)  # [T, H, dv] (padding rows stay 0)
        for w in self.inputs.work:
            w_uk, w_uv = mla.absorb_weights() if w.absorbed else (None, None)
            kernel = self.attention_backend == "triton" and self.pool.fp8 is None

            parts: list[Partial] = []
            tokens: list[torch.Tensor] = []
            if w.token.numel():
                if kernel:
                    part = self._attend_kernel(
                        mla, q_nope, q_pe, w_uk, w.token, w.q_pos, pages, w.key_blocks, w.key_pos
                    )
                else:
                    tiles = paged_tiles(pages, w.key_blocks, w.key_pos, tile, dequantize)
                    part = self._attend(mla, q_nope, q_pe, w_uk, w.token, w.q_pos, tiles)
                parts.append(part)
                tokens.append(w.token)
            for r in w.runs:
                token = torch.full((r.items, 1), r.token, dtype=torch.long)
                q_pos = torch.full_like(token, r.q_pos)
                if kernel:
                    blocks, positions = _run_keys(r, self.pool.block_size)
                    part = self._attend_kernel(
                        mla, q_nope, q_pe, w_uk, token, q_pos, pages, blocks, positions
                    )
                else:
                    tiles = run_tiles(rows, r.first_slot, r.items, r.width, r.first_pos, tile, dequantize)
                    part = self._attend(mla, q_nope, q_pe, w_uk, token, q_pos, tiles)
                parts.append(part)
                tokens.append(token)
            part = Partial(torch.cat([p.out for p in parts]), torch.cat([p.lse for p in parts]))
            token = torch.cat(tokens)
            merged = merge_partials(part, token, out.shape[0]).to(out.dtype)  # [T, H, C or dv]
            if w_uv is not None:
                merged = torch.einsum("thc,hdc->thd", merged, w_uv)
            queries = token[token >= 0]
            out[queries] = merged[queries]
        return out

    @staticmethod
    def _absorbed_query(
        q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, token: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The items' absorbed queries: q_lat = q_nope . W_UK [N, Q, H, C] and q_pe [N, Q, H, dr]
        (rows `token`; padding rows read row 0 and are masked by their position -1)."""
        index = token.clamp_min(0)
        return torch.einsum("nqhd,hdc->nqhc", q_nope[index], w_uk), q_pe[index]

    @staticmethod
    def _attend_kernel(
        mla: MLA,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        w_uk: torch.Tensor | None,
        token: torch.Tensor,
        q_pos: torch.Tensor,
        pages: torch.Tensor,
        key_blocks: torch.Tensor,
        key_pos: torch.Tensor,
    ) -> Partial:
        """`_attend` through the Triton kernels, reading the items' keys from `pages` by block id."""
        if w_uk is not None:
            q_lat, pe = PagedBackend._absorbed_query(q_nope, q_pe, w_uk, token)
            return paged_absorbed(q_lat, pe, q_pos, pages, key_blocks, key_pos, mla.softmax_scale)
        index = token.clamp_min(0)
        weight = mla.kv_b_proj.weight
        return paged_expanded(
            q_nope[index],
            q_pe[index],
            q_pos,
            pages,
            key_blocks,
            key_pos,
            weight,
            mla.v_dim,
            mla.softmax_scale,
        )

    @staticmethod
    def _attend(
        mla: MLA,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        w_uk: torch.Tensor | None,
        token: torch.Tensor,
        q_pos: torch.Tensor,
        tiles: Iterator[KeyTile],
    ) -> Partial:
        """Items' queries (rows `token` of q_nope / q_pe) over their tiles: absorbed when `w_uk` is
        given (out in latent space), else expanded."""
        if w_uk is not None:
            q_lat, pe = PagedBackend._absorbed_query(q_nope, q_pe, w_uk, token)
            return attend_absorbed(q_lat, pe, q_pos, tiles, mla.softmax_scale)
        index = token.clamp_min(0)
        weight = mla.kv_b_proj.weight
        return attend_expanded(q_nope[index], q_pe[index], q_pos, tiles, weight, mla.v_dim, mla.softmax_scale)


def _absorbed(config: ModelConfig, num_queries: int, num_keys: int) -> bool:
    c = config
    return absorbed_is_cheaper(
        num_queries, num_keys, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    )


def long_tensor(ids: Seq[int] | torch.Tensor) -> torch.Tensor:
    """A 1-D int64 CPU tensor of block ids. A Python list goes through an `array` buffer: ~4x faster
    than torch.as_tensor on thousands of ints (a long row's block table, every step)."""
    if isinstance(ids, torch.Tensor):
        return ids.to(torch.long)
    return (
        torch.frombuffer(array.array("q", ids), dtype=torch.long)
        if len(ids)
        else torch.zeros(0, dtype=torch.long)
    )


def _key_range(
    block_table: Seq[int], begin: int, length: int, width: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks and key positions of a context's keys [begin, length) (`begin` a multiple of the
    block size), padded to a multiple of `width` keys (a multiple of the block size): blocks
    [padded / block_size] (padding: block 0), positions [padded] (PAD_KEY_POS from `length` on)."""
    needed = -(-length // block_size)
    if needed > len(block_table):
        raise KVCachePoolError(f"{length} positions need {needed} blocks, the table has {len(block_table)}")
    padded = -(-(length - begin) // width) * width
    first = begin // block_size
    blocks = torch.zeros(padded // block_size, dtype=torch.long)
    blocks[: needed - first] = long_tensor(block_table[first:needed])
    positions = torch.arange(begin, begin + padded)
    positions[length - begin :] = PAD_KEY_POS
    return blocks, positions


def _consecutive_blocks(block_table: Seq[int], needed: int) -> int:
    """How many of the first `needed` blocks of the table are consecutive pool blocks (b, b + 1, ...)."""
    table = long_tensor(block_table[:needed])
    breaks = torch.nonzero(table[1:] - table[:-1] != 1)
    return needed if breaks.numel() == 0 else int(breaks[0, 0]) + 1


RUN_MIN_SPLITS = 8
"""A decode row is read in place (its own batched GEMMs) only from this many splits on: below, the
extra calls cost more than gathering its keys into the shared batch."""


def _decode_work(
    rows: list[tuple[RowSpec, int]], pool: KVCachePool, config: ModelConfig, tiles: TileConfig
) -> AttentionWork:
    """rows: (spec, flat index of its token). A row whose context [0, start + 1) spans at least
    `RUN_MIN_SPLITS` splits of `split_tokens` (whole blocks) inside its leading run of consecutive pool
    blocks has those splits read in place (a `KeyRun`). Every other key range (short rows whole, a long
    row's keys past its run) is gathered block by block into one batch of splits of width W: the
    longest such range if shorter than `split_tokens`, rounded up to the block size, so that short rows
    beside a long one are not padded to a full split."""
    bs = pool.block_size
    split = -(-tiles.split_tokens // bs) * bs
    runs: list[KeyRun] = []
    gathered: list[tuple[RowSpec, int, int]] = []  # (row, its token's flat index, first gathered key)
    for r, offset in rows:
        length = r.start + 1
        in_run = 0
        if length >= RUN_MIN_SPLITS * split:
            run_tokens = _consecutive_blocks(r.block_table, -(-length // bs)) * bs
            in_run = min(run_tokens, length) // split
            in_run = in_run if in_run >= RUN_MIN_SPLITS else 0
        if in_run:
            runs.append(KeyRun(offset, r.start, r.block_table[0] * bs, 0, in_run, split))
        if in_run * split < length:
            gathered.append((r, offset, in_run * split))
    longest = max((r.start + 1 - begin for r, _, begin in gathered), default=split)
    width = -(-min(split, longest) // bs) * bs
    tokens: list[int] = []
    q_pos: list[int] = []
    key_blocks: list[torch.Tensor] = [torch.zeros(0, width // bs, dtype=torch.long)]
    key_pos: list[torch.Tensor] = [torch.zeros(0, width, dtype=torch.long)]
    for r, offset, begin in gathered:
        blocks, positions = _key_range(r.block_table, begin, r.start + 1, width, bs)
        splits = positions.numel() // width
        key_blocks.append(blocks.view(splits, width // bs))
        key_pos.append(positions.view(splits, width))
        tokens.extend([offset] * splits)
        q_pos.extend([r.start] * splits)
    return AttentionWork(
        absorbed=_absorbed(config, 1, split if runs else width),
        token=torch.tensor(tokens, dtype=torch.long).view(-1, 1),
        q_pos=torch.tensor(q_pos, dtype=torch.long).view(-1, 1),
        key_blocks=torch.cat(key_blocks),
        key_pos=torch.cat(key_pos),
        runs=runs,
    )


def _prefill_work(r: RowSpec, offset: int, pool: KVCachePool, config: ModelConfig) -> AttentionWork:
    """One chunk: its n queries at positions start.. over the keys [0, start + n)."""
    n = len(r.token_ids)
    length = r.start + n
    blocks, positions = _key_range(r.block_table, 0, length, pool.block_size, pool.block_size)
    return AttentionWork(
        absorbed=_absorbed(config, n, length),
        token=(offset + torch.arange(n))[None, :],
        q_pos=(r.start + torch.arange(n))[None, :],
        key_blocks=blocks[None, :],
        key_pos=positions[None, :],
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
            sample_index.extend(range(offset + n - r.num_logits, offset + n))
    work = [_prefill_work(r, offset, pool, config) for r, offset in prefill_rows]
    if decode_rows:
        work.append(_decode_work(decode_rows, pool, config, tiles))
    if pad_slot is not None and bucket(len(ids)) > len(ids):
        pad = bucket(len(ids)) - len(ids)
        ids.extend([0] * pad)
        positions.extend([0] * pad)
        slots.append(torch.full((pad,), pad_slot, dtype=torch.long, device=pool.kv.device))
    device = pool.kv.device  # every index tensor of the step goes where the pool is (one copy each)
    return StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        slots=torch.cat(slots),
        work=[w.to(device) for w in work],
        sample_index=torch.tensor(sample_index, dtype=torch.long, device=device),
    )


def captured_rows(rows: Seq[RowSpec]) -> list[DecodeRow] | None:
    """The rows as captured-step rows when every one is a sampling row that wants the logits of each of
    its tokens: a 1-token decode row, or a speculative row verifying its drafts, which becomes one decode
    row per position (token j at start + j over the row's block table: the captured attention writes
    every row's latent before any row reads its keys, so position start + j sees the drafts before it
    as the eager step's causal mask lets it); else None (the step runs eager). The logits come back in
    row order, `num_logits` per row, as `ModelRunner.run` returns them."""
    if not all(r.sample and r.num_logits == len(r.token_ids) for r in rows):
        return None
    return [DecodeRow(t, r.start + j, r.block_table) for r in rows for j, t in enumerate(r.token_ids)]


class ModelRunner:
    def __init__(
        self,
        model: K2Model,
        pool: KVCachePool,
        pad_slot: int | None = None,
        tiles: TileConfig = DEFAULT_TILES,
        attention_backend: str = "torch",
        captured: CapturedDecode | None = None,
    ) -> None:
        """`pad_slot`: a pool slot no sequence owns; when given, steps are padded to row buckets.
        `tiles`: the attention's tile and split sizes. `attention_backend`: "torch" or "triton"
        (checked here: triton needs CUDA tensors or TRITON_INTERPRET=1, AttentionBackendError if not).
        `captured`: serves the steps made only of 1-token decode rows (engine/captured.py)."""
        check_backend(attention_backend, pool.kv.device)
        self.model = model
        self.pool = pool
        self.pad_slot = pad_slot
        self.tiles = tiles
        self.attention_backend = attention_backend
        self.captured = captured

    @torch.inference_mode()
    def run(self, rows: Seq[RowSpec], on_layer: LayerHook | None = None) -> torch.Tensor:
        """Compute the rows' tokens into the cache; return fp32 logits [S, V]: `num_logits` rows per
        sampling row, in row order."""
        if self.captured is not None and on_layer is None:
            decode = captured_rows(rows)
            if decode is not None and self.captured.accepts(decode):
                return self.captured.run(decode)
        inputs = build_step_inputs(rows, self.pool, self.model.config, self.tiles, self.pad_slot)
        backend = PagedBackend(self.pool, inputs, self.tiles, on_layer, self.attention_backend)
        hidden = self.model.forward_hidden(inputs.input_ids, inputs.positions, backend)
        return self.model.logits(hidden[inputs.sample_index])
