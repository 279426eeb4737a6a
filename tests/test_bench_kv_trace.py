"""The pure parts of `k2serve bench kv-trace` and `kv-history`: trace windows, the figures of one policy's
replay against the ideal caches, and the reuse of later turns."""

from __future__ import annotations

import pytest

from k2serve.bench.kv_history import report as history_report
from k2serve.bench.kv_history import reuse
from k2serve.bench.kv_trace import (
    PolicyResult,
    distinct_blocks,
    prefill_decisions,
    report,
    summarize,
    windows,
)
from k2serve.loadgen.dataset import BenchRequest
from k2serve.loadgen.record import RequestRecord
from k2serve.loadgen.stats import SLO


def test_windows_split_in_order_with_arrivals_relative_to_each_start() -> None:
    reqs = [BenchRequest(i, (1,), 1, arrival_s=float(i * 10)) for i in range(5)]
    parts = windows(reqs, 2)
    assert [[r.index for r in p] for p in parts] == [[0, 1], [2, 3, 4]]
    assert [[r.arrival_s for r in p] for p in parts] == [[0.0, 10.0], [0.0, 10.0, 20.0]]
    assert len(windows(reqs, 9)) == 5  # no empty window


def _record(i: int, cached: int, ttft_s: float, ok: bool = True) -> RequestRecord:
    r = RequestRecord(i, 0.0, 8, 2, finish_s=1.0 if ok else None, first_token_s=ttft_s)
    r.cached_tokens, r.output_tokens = cached, 2
    r.error = None if ok else "500"
    return r


def test_summarize_compares_hits_with_the_ideal_caches_over_completed_requests() -> None:
    # blocks of 4 tokens: request 1 repeats request 0 (one cacheable block), request 2 too
    blocks = [[(1, 4), (2, 4), (3, 1)]] * 3
    records = [_record(0, 0, 0.1), _record(1, 8, 0.2), _record(2, 0, 0.3, ok=False)]
    out = summarize(PolicyResult("kv", records, capacity_blocks=1, wall_s=2.0), blocks, 4, SLO(150.0, None))
    # ideal, capacity 1: request 0's first block only (4 tokens) -> request 1 hits 4; unbounded: 8
    assert (out["cached_tokens"], out["best_lru_tokens"], out["best_unbounded_tokens"]) == (8, 4, 8)
    assert out["of_best_lru"] == 2.0 and out["of_unbounded"] == 1.0  # a real cache can beat a 1-block LRU
    assert (out["requests"], out["failed"], out["prompt_tokens"]) == (3, 1, 16)
    assert out["goodput_fraction"] == pytest.approx(1 / 3) and out["goodput_per_s"] == 0.5  # only 0 met
    assert out["ttft_p50_ms"] == pytest.approx(150.0) and out["ttft_p99_ms"] == pytest.approx(199.0)
    assert out["errors"] == {"500": 1}
    # per window (request index ranges): window 0 = request 0 (best 0: no figure), window 1 = 1 and 2
    windowed = PolicyResult("kv", records, capacity_blocks=1, wall_s=2.0, windows=[(0, 1), (1, 3)])
    assert summarize(windowed, blocks, 4, SLO(150.0, None))["of_best_lru_by_window"] == [2.0]


def test_with_a_store_the_best_is_one_lru_of_the_pools_and_the_store() -> None:
    """A cluster with a shared store: "best total" is one LRU of the pools' blocks plus the store's
    (here 1 + 1 = 2 blocks: request 1 hits both of request 0's), the device-only best (the pools alone,
    1 block) stays beside it; the hits by tier and the report's row carry through."""
    blocks = [[(1, 4), (2, 4), (3, 1)]] * 2
    records = [_record(0, 0, 0.1), _record(1, 8, 0.2)]
    result = PolicyResult(
        "kv",
        records,
        capacity_blocks=1,
        wall_s=2.0,
        kv_store="mooncake",
        store_capacity_blocks=1,
        tier_hits={"device": 4, "mooncake": 4},
    )
    out = summarize(result, blocks, 4, SLO(150.0, None))
    assert (out["best_total_tokens"], out["best_lru_tokens"], out["best_unbounded_tokens"]) == (8, 4, 8)
    assert out["of_best_total"] == 1.0 and out["of_best_lru"] == 2.0
    assert out["tier_hit_tokens"] == {"device": 4, "mooncake": 4} and out["kv_store"] == "mooncake"
    without = summarize(
        PolicyResult("kv", records, capacity_blocks=1, wall_s=2.0), blocks, 4, SLO(150.0, None)
    )
    assert without["best_total_tokens"] == without["best_lru_tokens"] == 4  # no store: the same best
    line = report([{"prefill": 2, **out}])[1]
    assert line.split()[:8] == ["2", "kv", "mooncake", "8", "8", "(", "2)", "100.0%"]
    assert "hits by tier {'device': 4, 'mooncake': 4}" in line
    assert distinct_blocks(blocks, 4) == 2


def test_history_reuse_counts_later_successful_turns() -> None:
    reqs = [
        {"turn": 0, "prompt_tokens": 100, "cached_tokens": 0, "error": None},
        {"turn": 1, "prompt_tokens": 150, "cached_tokens": 96, "error": None},
        {"turn": 2, "prompt_tokens": 200, "cached_tokens": 144, "error": None},
        {"turn": 2, "prompt_tokens": 200, "cached_tokens": None, "error": "timeout"},
    ]
    assert reuse(reqs) == (350, 240)
    lines = history_report({"session": [(350, 240)], "resend": [(350, 228)]})
    assert lines[-1] == "whole-history reuse / session reuse: 95.0%"


def test_prefill_decisions_from_the_router_metrics() -> None:
    text = """# TYPE k2serve_router_routing_decisions counter
k2serve_router_routing_decisions_total{model_name="m",role="decode",reason="tpot"} 7.0
k2serve_router_routing_decisions_total{model_name="m",role="prefill",reason="load"} 3.0
k2serve_router_routing_decisions_total{model_name="m",role="prefill",reason="prefix_hit"} 40.0
# TYPE k2serve_router_predicted_hit_tokens counter
k2serve_router_predicted_hit_tokens_total{model_name="m"} 640.0
# TYPE k2serve_router_prefill_cached_tokens counter
k2serve_router_prefill_cached_tokens_total{model_name="m"} 608.0
"""
    assert prefill_decisions(text) == {
        "load": 3,
        "prefix_hit": 40,
        "predicted_hit_tokens": 640,
        "found_hit_tokens": 608,
    }
