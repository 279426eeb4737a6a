"""Tiled MLA attention with an online softmax over the paged latent: the reference algorithm.

This is the FlashAttention / FlashMLA algorithm written in plain torch, and the contract a GPU kernel
is checked against tile for tile. Work comes as *items*: the query rows of one sequence (a prefill
chunk, or one decode token) against a range of that sequence's cached keys. An item's keys are read
a tile of whole cache blocks at a time straight from the pool through its block ids; per tile the item keeps only

    m [N, Q, H]   running max of the scaled scores      l [N, Q, H]   running sum of exp(s - m)
    acc [N, Q, H, Dv] running sum of exp(s - m) * v     (all fp32)

so the extra memory is O(Q x tile x H), never O(Q x context x H). An item's result is a `Partial`
(normalised output and log-sum-exp); the partials of one query over several key ranges (split-K, as
FlashDecoding does for long decode contexts) are merged by log-sum-exp (`merge_partials`).

Two ways to score a tile, the same function (see `model/mla.py`):
- expanded: k_nope, v = kv_b_proj(c_kv) per head for the tile's keys; Dv = v_head_dim;
- absorbed: the query carries W_UK (q_lat = q_nope . W_UK), keys and values are the latent itself;
  Dv = kv_lora_rank, and W_UV is applied by the caller after the merge.
`absorbed_is_cheaper` picks one per item by FLOPs. Causality is by position: key k of item n is seen
by query q iff key_pos[n, k] <= q_pos[n, q]; padding keys carry `PAD_KEY_POS`, padding queries -1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_TILES",
    "PAD_KEY_POS",
    "KeyTile",
    "OnlineSoftmax",
    "Partial",
    "TileConfig",
    "absorbed_is_cheaper",
    "attend_absorbed",
    "attend_expanded",
    "merge_partials",
    "paged_tiles",
    "run_tiles",
]

PAD_KEY_POS = 2**62
"""Position given to padding keys: after every query, so the causal test masks them."""


@dataclass(frozen=True)
class TileConfig:
    """`tile_tokens`: keys per tile (the inner loop). `split_tokens`: keys per decode split (split-K
    work items, merged by log-sum-exp); a decode row's context is cut into splits of at most this."""

    tile_tokens: int = 512
    split_tokens: int = 512

    def __post_init__(self) -> None:
        for name in ("tile_tokens", "split_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TileConfig.{name} must be an int >= 1, got {value!r}")


DEFAULT_TILES = TileConfig()


@dataclass
class Partial:
    """Attention of N items' queries over their key ranges."""

    out: torch.Tensor  # [N, Q, H, Dv] fp32, softmax-normalised over the item's keys (0 if none seen)
    lse: torch.Tensor  # [N, Q, H] fp32 log-sum-exp of the scaled scores (-inf if no key was seen)


@dataclass
class KeyTile:
    """Keys [t0, t1) of every item: the cached latent rows and their positions."""

    latent: torch.Tensor  # [N, T, C + dr]
    positions: torch.Tensor  # [N, T] long


class OnlineSoftmax:
    """Running max / sum / accumulator of N items' queries; `update` once per tile, then `finish`."""

    def __init__(self, shape: tuple[int, int, int], dv: int, device: torch.device) -> None:
        self.m = torch.full(shape, float("-inf"), device=device)  # [N, Q, H]
        self.l = torch.zeros(shape, device=device)  # [N, Q, H]
        self.acc = torch.zeros(*shape, dv, device=device)  # [N, Q, H, Dv]

    def update(self, scores: torch.Tensor, values: torch.Tensor) -> None:
        """scores [N, Q, H, T] fp32, scaled, -inf where masked; values [N, T, Dv] (shared by the heads)
        or [N, T, H, Dv]. P is cast to the values' dtype for the P.V product, accumulated in fp32."""
        m_new = torch.maximum(self.m, scores.amax(-1))  # [N, Q, H]
        base = torch.where(torch.isinf(m_new), 0.0, m_new)  # rows with nothing seen yet stay all-zero
        alpha = torch.exp(self.m - base)  # rescales what was accumulated under the old max
        p = torch.exp(scores - base[..., None])  # [N, Q, H, T]
        self.l = self.l * alpha + p.sum(-1)
        if values.dim() == 3:  # shared by the heads: one batched GEMM [N, Q*H, T] x [N, T, Dv]
            pv = torch.bmm(p.to(values.dtype).flatten(1, 2), values).view(*p.shape[:3], -1).float()
        else:
            pv = torch.einsum("nqht,nthd->nqhd", p.to(values.dtype), values).float()  # [N, Q, H, Dv]
        self.acc = self.acc * alpha[..., None] + pv
        self.m = m_new

    def finish(self) -> Partial:
        seen = self.l > 0
        out = self.acc / torch.where(seen, self.l, 1.0)[..., None]
        lse = torch.where(seen, self.m + torch.log(torch.where(seen, self.l, 1.0)), float("-inf"))
        return Partial(out, lse)


def paged_tiles(
    pages: torch.Tensor,
    key_blocks: torch.Tensor,
    key_pos: torch.Tensor,
    tile_tokens: int,
    dequantize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[KeyTile]:
    """Read N items' keys tile by tile from one layer's paged latent [num_blocks, block_size, C + dr].

    key_blocks [N, B]: the pool blocks holding item n's keys, in order (padding: any valid block);
    key_pos [N, B * block_size]: the position of every key those blocks hold (keys outside the item's
    range, padding included: `PAD_KEY_POS`). A tile is whole blocks, `tile_tokens // block_size` of
    them (at least one), gathered as contiguous block copies: one index per block, not per key, so
    a long context costs block_size times fewer gather indices. Only one tile [N, T, C + dr] is
    gathered at a time. With a quantised cache `pages` are its raw rows [num_blocks, block_size, W] and
    `dequantize` turns one gathered tile [N, T, W] into values [N, T, C + dr] (an fp8 cache is
    dequantized per tile, never as a whole). Flat slot addressing is the case block_size = 1
    (`rows[:, None, :]`, key_blocks = the slots).
    """
    block_size = pages.shape[1]
    per_tile = max(1, tile_tokens // block_size)
    for b0 in range(0, key_blocks.shape[1], per_tile):
        b1 = min(b0 + per_tile, key_blocks.shape[1])
        tile = pages[key_blocks[:, b0:b1]].flatten(1, 2)  # [N, T, W]
        positions = key_pos[:, b0 * block_size : b1 * block_size]
        yield KeyTile(tile if dequantize is None else dequantize(tile), positions)


def run_tiles(
    rows: torch.Tensor,
    first_slot: int,
    items: int,
    width: int,
    first_pos: int,
    tile_tokens: int,
    dequantize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[KeyTile]:
    """Keys held by consecutive slots, read in place: item n is the `width` keys at slots
    first_slot + n * width .. (positions first_pos + n * width ..) of one layer's flat rows [S, W].
    A long context whose blocks are consecutive in the pool (what one allocation for a whole prompt
    gives) is attended through views of the pool, with no gathered copy; every key is a real one."""
    keys = rows[first_slot : first_slot + items * width].view(items, width, rows.shape[-1])
    positions = (first_pos + torch.arange(items * width, device=rows.device)).view(items, width)
    for t0 in range(0, width, tile_tokens):
        tile = keys[:, t0 : t0 + tile_tokens]
        yield KeyTile(tile if dequantize is None else dequantize(tile), positions[:, t0 : t0 + tile_tokens])


def _mask(scores: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """-inf where key position > query position; scores [N, Q, H, T], q_pos [N, Q], k_pos [N, T].
    A tile whose keys all precede every query (most tiles of a long context) needs no mask. Key
    positions never decrease along an item's keys (padding, PAD_KEY_POS, comes last), so the tile's
    latest key is in its last column."""
    if bool(k_pos[:, -1].max() <= q_pos.min()):
        return scores
    allowed = k_pos[:, None, :] <= q_pos[:, :, None]  # [N, Q, T]
    return scores.masked_fill(~allowed[:, :, None, :], float("-inf"))


def attend_expanded(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    q_pos: torch.Tensor,
    tiles: Iterator[KeyTile],
    kv_b_weight: torch.Tensor,
    v_dim: int,
    scale: float,
) -> Partial:
    """q_nope [N, Q, H, dn], q_pe [N, Q, H, dr], q_pos [N, Q]; kv_b_weight [H * (dn + dv), C].
    Each tile's latent is expanded per head (k_nope, v); returns out [N, Q, H, dv]."""
    n, q, h, dn = q_nope.shape
    dr = q_pe.shape[-1]
    state = OnlineSoftmax((n, q, h), v_dim, q_nope.device)
    for tile in tiles:
        latent = tile.latent.to(q_nope.dtype)
        c_kv, k_pe = latent.split([latent.shape[-1] - dr, dr], dim=-1)  # [N, T, C], [N, T, dr]
        kvb = (c_kv @ kv_b_weight.T).unflatten(-1, (h, dn + v_dim))  # [N, T, H, dn + dv]
        k_nope, v = kvb.split([dn, v_dim], dim=-1)
        scores = torch.einsum("nqhd,nthd->nqht", q_nope, k_nope) + torch.einsum("nqhr,ntr->nqht", q_pe, k_pe)
        state.update(_mask((scores * scale).float(), q_pos, tile.positions), v)
    return state.finish()


def attend_absorbed(
    q_lat: torch.Tensor, q_pe: torch.Tensor, q_pos: torch.Tensor, tiles: Iterator[KeyTile], scale: float
) -> Partial:
    """q_lat [N, Q, H, C] (q_nope . W_UK), q_pe [N, Q, H, dr], q_pos [N, Q]. Keys are the latent
    [c_kv | k_pe], values c_kv, shared by all heads; returns out in latent space [N, Q, H, C].

    The query is [q_lat | q_pe] against the whole latent row, so a tile is read by one batched GEMM for
    the scores and one for P.V (over its c_kv columns, a strided view: no copy)."""
    n, q, h, c = q_lat.shape
    state = OnlineSoftmax((n, q, h), c, q_lat.device)
    query = torch.cat((q_lat, q_pe), dim=-1).reshape(n, q * h, -1)  # [N, Q*H, C + dr]
    for tile in tiles:
        latent = tile.latent.to(q_lat.dtype)  # [N, T, C + dr]
        scores = torch.bmm(query, latent.transpose(1, 2)).view(n, q, h, -1)  # [N, Q, H, T]
        state.update(_mask((scores * scale).float(), q_pos, tile.positions), latent[..., :c])
    return state.finish()


def merge_partials(part: Partial, token: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Combine the partials of the same query by log-sum-exp: token [N, Q] names the output row of
    each (item, query), -1 for padding. Returns [num_tokens, H, Dv] fp32 (rows never named are 0)."""
    valid = token >= 0
    out, lse, tok = part.out[valid], part.lse[valid], token[valid]  # [M, H, Dv], [M, H], [M]
    h, dv = out.shape[-2:]
    top = torch.full((num_tokens, h), float("-inf"), device=out.device)
    top.scatter_reduce_(0, tok[:, None].expand(-1, h), lse, "amax")  # [T, H]
    base = torch.where(torch.isinf(top), 0.0, top)[tok]  # [M, H]
    weight = torch.exp(lse - base)  # [M, H]; 0 for partials that saw no key
    num = torch.zeros(num_tokens, h, dv, device=out.device).index_add_(0, tok, out * weight[..., None])
    den = torch.zeros(num_tokens, h, device=out.device).index_add_(0, tok, weight)
    return num / torch.where(den > 0, den, 1.0)[..., None]


def absorbed_is_cheaper(
    num_queries: int, num_keys: int, kv_rank: int, nope_dim: int, rope_dim: int, v_dim: int
) -> bool:
    """FLOPs per head (multiply-adds) of the two ways for Q queries over K keys:

    expanded = K * C * (dn + dv)  [kv_b_proj on every key]  + Q * K * (dn + dr + dv)
    absorbed = Q * C * (dn + dv)  [W_UK, W_UV on queries]   + Q * K * (2C + dr)

    Decode (Q = 1) is absorbed; a prefill chunk over a context of similar length is expanded.
    """
    up = kv_rank * (nope_dim + v_dim)
    expanded = num_keys * up + num_queries * num_keys * (nope_dim + rope_dim + v_dim)
    absorbed = num_queries * up + num_queries * num_keys * (2 * kv_rank + rope_dim)
    return absorbed < expanded
