"""The tiled online-softmax MLA attention (model/attention.py) against the naive full softmax of
model/mla.py: both ways (expanded, absorbed), several tile sizes with ragged last tiles, split-K merged
by log-sum-exp, paged (scattered) slots, fp32 tight and bf16 loose, at toy and at K2's real head dims."""

from __future__ import annotations

import pytest
import torch

from k2serve.config import ModelConfig
from k2serve.model.attention import (
    PAD_KEY_POS,
    Partial,
    TileConfig,
    absorbed_is_cheaper,
    attend_absorbed,
    attend_expanded,
    merge_partials,
    paged_tiles,
)
from k2serve.model.mla import MLA
from k2serve.model.presets import PRESETS

TOY = {
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 24,
    "num_attention_heads": 3,
}
K2_HEADS = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128}


def make_mla(dims: dict[str, int], heads: int, dtype: torch.dtype) -> MLA:
    cfg = ModelConfig.from_dict(
        dict(PRESETS["tiny"]) | {"hidden_size": 64, "q_lora_rank": 32, "num_attention_heads": heads} | dims
    )
    torch.manual_seed(0)
    mla = MLA(cfg, 0)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 1.0)
    return mla.to(dtype)


def tiled(
    mla: MLA,
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    start: int,
    tile: int,
    absorbed: bool,
    splits: int = 1,
) -> torch.Tensor:
    """Queries at positions start.. of one sequence over its context kv [K, C + dr], stored at shuffled
    slots of a larger pool, cut into `splits` key ranges (one work item each) merged by log-sum-exp."""
    k, q = kv.shape[0], q_nope.shape[0]
    g = torch.Generator().manual_seed(k)
    rows = torch.randn(3 * k, kv.shape[1], generator=g).to(kv.dtype)
    slots = torch.randperm(3 * k, generator=g)[:k]
    rows[slots] = kv
    bounds = torch.linspace(0, k, splits + 1).round().long().tolist()
    width = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    key_slots = torch.zeros(splits, width, dtype=torch.long)
    key_pos = torch.full((splits, width), PAD_KEY_POS, dtype=torch.long)
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        key_slots[i, : b - a] = slots[a:b]
        key_pos[i, : b - a] = torch.arange(a, b)
    q_pos = (start + torch.arange(q)).expand(splits, q)
    qn, qp = q_nope.expand(splits, *q_nope.shape), q_pe.expand(splits, *q_pe.shape)
    tiles = paged_tiles(rows[:, None, :], key_slots, key_pos, tile)  # block size 1: blocks are slots
    part: Partial
    if absorbed:
        w_uk, w_uv = mla.absorb_weights()
        q_lat = torch.einsum("nqhd,hdc->nqhc", qn, w_uk)
        part = attend_absorbed(q_lat, qp, q_pos, tiles, mla.softmax_scale)
    else:
        part = attend_expanded(qn, qp, q_pos, tiles, mla.kv_b_proj.weight, mla.v_dim, mla.softmax_scale)
    token = torch.arange(q).expand(splits, q)
    out = merge_partials(part, token, q)  # [Q, H, Dv]
    if absorbed:
        out = torch.einsum("qhc,hdc->qhd", out.to(q_nope.dtype), w_uv)
    return out.to(q_nope.dtype)


def naive(mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, start: int) -> torch.Tensor:
    k, q = kv.shape[0], q_nope.shape[0]
    mask = torch.arange(k)[None, :] <= (start + torch.arange(q))[:, None]  # [Q, K]
    return mla.attend_expanded(q_nope[None], q_pe[None], kv[None], mask[None])[0]


def inputs(mla: MLA, q: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(q * 1000 + k)
    h = mla.n_heads
    q_nope = torch.randn(q, h, mla.nope_dim, generator=g).to(dtype)
    q_pe = torch.randn(q, h, mla.rope_dim, generator=g).to(dtype)
    kv = torch.randn(k, mla.kv_rank + mla.rope_dim, generator=g).to(dtype)
    return q_nope, q_pe, kv


@pytest.mark.parametrize("absorbed", [False, True])
@pytest.mark.parametrize("tile", [1, 7, 16, 50, 200])
@pytest.mark.parametrize(("q", "k"), [(1, 1), (1, 37), (13, 13), (9, 100)])
def test_tiled_equals_full_softmax_fp32(absorbed: bool, tile: int, q: int, k: int) -> None:
    mla = make_mla(TOY, TOY["num_attention_heads"], torch.float32)
    q_nope, q_pe, kv = inputs(mla, q, k, torch.float32)
    want = naive(mla, q_nope, q_pe, kv, k - q)
    got = tiled(mla, q_nope, q_pe, kv, k - q, tile, absorbed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("absorbed", [False, True])
def test_split_k_merged_by_log_sum_exp(splits: int, absorbed: bool) -> None:
    """Decode (one query at the last position) and a prefill chunk, context cut in ragged splits; splits
    that see no key of an early query (its future) must not change it."""
    mla = make_mla(TOY, 3, torch.float32)
    for q, k in ((1, 77), (6, 40)):
        q_nope, q_pe, kv = inputs(mla, q, k, torch.float32)
        want = naive(mla, q_nope, q_pe, kv, k - q)
        got = tiled(mla, q_nope, q_pe, kv, k - q, 5, absorbed, splits)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("absorbed", [False, True])
def test_tiled_at_k2_head_dims(absorbed: bool) -> None:
    """K2's real heads: 576-value latent (512 c_kv + 64 rope), 128 nope, 128 v; fp32 and bf16."""
    mla32 = make_mla(K2_HEADS, 2, torch.float32)
    q_nope, q_pe, kv = inputs(mla32, 24, 300, torch.float32)
    want = naive(mla32, q_nope, q_pe, kv, 300 - 24)
    for tile in (64, 128, 97):
        got = tiled(mla32, q_nope, q_pe, kv, 300 - 24, tile, absorbed, splits=2)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    mla16 = make_mla(K2_HEADS, 2, torch.bfloat16)
    got16 = tiled(mla16, q_nope.bfloat16(), q_pe.bfloat16(), kv.bfloat16(), 300 - 24, 64, absorbed, splits=2)
    err = (got16.float() - want).abs().max().item()
    assert err < 0.05 * want.abs().max().item(), err


def test_online_softmax_keeps_large_scores_finite() -> None:
    """Scores far above exp's range (1e4) in a late tile: the running max rescales what came before."""
    mla = make_mla(TOY, 3, torch.float32)
    q_nope, q_pe, kv = inputs(mla, 2, 40, torch.float32)
    kv[30:] *= 300.0
    want = naive(mla, q_nope, q_pe, kv, 38)
    got = tiled(mla, q_nope, q_pe, kv, 38, 8, absorbed=False)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_cost_choice() -> None:
    k2 = {"kv_rank": 512, "nope_dim": 128, "rope_dim": 64, "v_dim": 128}
    assert absorbed_is_cheaper(1, 131072, **k2)  # decode
    assert not absorbed_is_cheaper(2048, 2048, **k2)  # a fresh prefill chunk
    assert absorbed_is_cheaper(8, 131072, **k2)  # a few tokens over a long context
    assert not absorbed_is_cheaper(4096, 131072, **k2)


def test_tile_config_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="tile_tokens"):
        TileConfig(tile_tokens=0)
