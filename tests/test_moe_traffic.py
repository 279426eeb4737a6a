"""`k2serve bench moe-traffic`: the computed HBM bytes of one MoE layer, fused against unfused, checked
against hand counts at K2's dims."""

from __future__ import annotations

import json

import pytest

from k2serve.bench.moe_traffic import K2_MOE, main, moe_traffic


def test_batch_one_at_k2_dims_by_hand() -> None:
    """B=1, top-8: N = 8 rows. Unfused moves 73 rows of H (gather 16, GEMM1 8, GEMM2 8, weight 16,
    zeros 1, index_add 24) and 64 of I (GEMM1 16, silu 16, mul 24, GEMM2 8); fused 25 of H (gate_up 8,
    down 8, sum 8 + 1) and 16 of I; 2 bytes each. Weights: 8 experts x 3 x 7168 x 2048 x (4 + 16/32) bits."""
    r = moe_traffic(1, **K2_MOE)
    assert r.unfused_act_bytes == (73 * 7168 + 64 * 2048) * 2 == 1_308_672
    assert r.fused_act_bytes == (25 * 7168 + 16 * 2048) * 2 == 423_936
    assert r.experts_touched == pytest.approx(8.0)
    assert r.weight_bytes == pytest.approx(8 * 3 * 7168 * 2048 * 0.5625)
    assert (r.unfused_kernels, r.fused_kernels) == (8, 3)


def test_more_tokens_touch_more_experts_and_save_more(capsys: pytest.CaptureFixture[str]) -> None:
    one, many = moe_traffic(1, **K2_MOE), moe_traffic(64, **K2_MOE)
    assert 8 < many.experts_touched < 384 and many.saved_bytes == 64 * one.saved_bytes  # linear in B
    assert one.saved_fraction < many.saved_fraction < 0.01  # weights dominate: under 1% at batch 64
    assert main(["--batch-sizes", "1,64", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["batch"] for r in rows] == [1, 64] and rows[1]["fused_act_bytes"] == many.fused_act_bytes
