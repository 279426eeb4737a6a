"""Runs one scheduled step of the model over the paged MLA latent cache.

All scheduled tokens of the step are flattened into one ragged batch [T]. Each layer writes the
new tokens' latent into the pool, then attends per row over the row's cached context, gathered
through the block tables into a padded [B, K, kv_dim] tensor with a mask, so the math is batched
with no per-sequence Python loop. Rows computing one token (decodes) use the weight-absorbed path
over the latent; rows computing several (prefill chunks) use the expanded path.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from k2serve.kvcache.pool import KVCachePool
from k2serve.model.mla import MLA
from k2serve.model.model import K2Model
from k2serve.model.shapes import bucket


@dataclass
class RowGroup:
    """Rows attended the same way. q_index [B, Q] indexes the flat step tokens (padding repeats index 0)."""

    absorbed: bool
    block_tables: torch.Tensor  # [B, M] long, padded with -1
    q_index: torch.Tensor  # [B, Q] long
    q_valid: torch.Tensor  # [B, Q] bool
    mask: torch.Tensor  # [B, Q, M * block_size] bool, True = may attend
    flat_index: torch.Tensor  # [N] flat token indices of the valid queries, in q_valid order


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] flat pool slots of the new tokens
    groups: list[RowGroup]
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

    def __init__(self, pool: KVCachePool, inputs: StepInputs, on_layer: LayerHook | None = None) -> None:
        self.pool = pool
        self.inputs = inputs
        self.on_layer = on_layer

    def __call__(
        self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor
    ) -> torch.Tensor:
        layer = mla.layer_idx
        self.pool.write(layer, self.inputs.slots, latent)
        if self.on_layer is not None:
            self.on_layer(layer)
        out = q_nope.new_zeros(q_nope.shape[0], mla.n_heads, mla.v_dim)  # [T, H, dv] (padding rows stay 0)
        for g in self.inputs.groups:
            kv = self.pool.gather(layer, g.block_tables).to(q_nope.dtype)  # [B, K, C + dr]
            attend = mla.attend_absorbed if g.absorbed else mla.attend_expanded
            o = attend(q_nope[g.q_index], q_pe[g.q_index], kv, g.mask)  # [B, Q, H, dv]
            out[g.flat_index] = o[g.q_valid]
        return out


def _group(rows: list[tuple[RowSpec, int]], block_size: int, absorbed: bool) -> RowGroup:
    """rows: (spec, offset of its first token in the flat step)."""
    b = len(rows)
    q = max(len(r.token_ids) for r, _ in rows)
    m = max(len(r.block_table) for r, _ in rows)
    tables = torch.full((b, m), -1, dtype=torch.long)
    lens = torch.tensor([len(r.token_ids) for r, _ in rows])  # [B]
    starts = torch.tensor([r.start for r, _ in rows])  # [B]
    offsets = torch.tensor([o for _, o in rows])  # [B]
    for i, (r, _) in enumerate(rows):
        tables[i, : len(r.block_table)] = torch.tensor(r.block_table, dtype=torch.long)
    ar = torch.arange(q)
    q_valid = ar[None, :] < lens[:, None]  # [B, Q]
    q_index = torch.where(q_valid, offsets[:, None] + ar[None, :], 0)
    q_pos = starts[:, None] + ar[None, :]  # [B, Q] absolute positions
    k_pos = torch.arange(m * block_size)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # causal over the row's own positions
    mask &= q_valid[:, :, None]
    mask[:, :, 0] |= ~q_valid  # padded queries attend to one slot so softmax stays finite
    return RowGroup(absorbed, tables, q_index, q_valid, mask, q_index[q_valid])


def build_step_inputs(rows: Seq[RowSpec], pool: KVCachePool, pad_slot: int | None = None) -> StepInputs:
    """Flatten the rows into one ragged batch. With `pad_slot`, the batch is padded to a row bucket with
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
    groups = [_group(g, pool.block_size, absorbed=g is decode_rows) for g in (decode_rows, prefill_rows) if g]
    if pad_slot is not None and bucket(len(ids)) > len(ids):
        pad = bucket(len(ids)) - len(ids)
        ids.extend([0] * pad)
        positions.extend([0] * pad)
        slots.append(torch.full((pad,), pad_slot, dtype=torch.long))
    return StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        slots=torch.cat(slots),
        groups=groups,
        sample_index=torch.tensor(sample_index, dtype=torch.long),
    )


class ModelRunner:
    def __init__(self, model: K2Model, pool: KVCachePool, pad_slot: int | None = None) -> None:
        """`pad_slot`: a pool slot no sequence owns; when given, steps are padded to row buckets."""
        self.model = model
        self.pool = pool
        self.pad_slot = pad_slot

    @torch.inference_mode()
    def run(self, rows: Seq[RowSpec], on_layer: LayerHook | None = None) -> torch.Tensor:
        """Compute the rows' tokens into the cache; return fp32 logits [S, V] for the sampling rows."""
        inputs = build_step_inputs(rows, self.pool, self.pad_slot)
        backend = PagedBackend(self.pool, inputs, on_layer)
        hidden = self.model.forward_hidden(inputs.input_ids, inputs.positions, backend)
        return self.model.logits(hidden[inputs.sample_index])
