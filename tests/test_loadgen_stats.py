"""Statistics of a run on synthetic records: per-request latencies, percentiles, throughput, goodput under
SLOs, warm-up exclusion, errors vs rejections, prefix-cache ratios, the in-flight curve, the report."""

from __future__ import annotations

import pytest

from k2serve.loadgen.record import RequestRecord
from k2serve.loadgen.report import format_report
from k2serve.loadgen.stats import SLO, in_flight_curve, latency_summary, percentiles, summarize


def ok_record(
    index: int, start: float, ttft: float, tpot: float, n_out: int, prompt: int = 100, cached: int = 0
) -> RequestRecord:
    """A successful request whose tokens arrive one chunk each: first at start + ttft, then every tpot."""
    first = start + ttft
    chunks = [first + i * tpot for i in range(n_out)]
    return RequestRecord(
        index, start, prompt, n_out, best_cached_tokens=cached + 10, finish_s=chunks[-1],
        first_token_s=first, chunk_s=chunks, output_tokens=n_out, prompt_tokens=prompt, cached_tokens=cached,
    )  # fmt: skip


def failed_record(index: int, start: float, end: float, error: str, rejected: bool = False) -> RequestRecord:
    return RequestRecord(index, start, 50, 10, finish_s=end, error=error, rejected=rejected)


def test_record_latencies() -> None:
    r = ok_record(0, start=1.0, ttft=0.2, tpot=0.05, n_out=5)
    assert (
        r.ttft_s == pytest.approx(0.2) and r.e2e_s == pytest.approx(0.4) and r.tpot_s == pytest.approx(0.05)
    )
    assert r.itl_s == pytest.approx([0.05] * 4)
    one = ok_record(1, 0.0, 0.1, 0.05, n_out=1)
    assert one.tpot_s is None and one.itl_s == []
    # two tokens in one chunk: one ITL sample fewer, TPOT still over tokens
    merged = ok_record(2, 0.0, 0.1, 0.05, n_out=3)
    merged.chunk_s = [merged.chunk_s[0], merged.chunk_s[2]]
    assert merged.itl_s == pytest.approx([0.1]) and merged.tpot_s == pytest.approx(0.05)
    assert failed_record(3, 0, 1, "500").tpot_s is None


def test_percentiles_interpolate_linearly() -> None:
    xs = [float(i) for i in range(1, 101)]  # 1..100
    assert percentiles(xs) == pytest.approx([50.5, 90.1, 99.01])
    assert percentiles([3.0]) == [3.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="empty"):
        percentiles([])
    s = latency_summary([0.001, 0.002, 0.003, 0.004])
    assert s == {"n": 4, "mean": 2.5, "p50": 2.5, "p90": 3.7, "p99": 3.97, "max": 4.0}
    assert latency_summary([])["p50"] is None


def test_goodput_counts_requests_meeting_both_slos() -> None:
    records = [
        ok_record(0, 0.0, ttft=0.1, tpot=0.02, n_out=10),  # meets both
        ok_record(1, 0.5, ttft=0.3, tpot=0.02, n_out=10),  # TTFT too slow
        ok_record(2, 1.0, ttft=0.1, tpot=0.06, n_out=10),  # TPOT too slow
        ok_record(3, 1.5, ttft=0.15, tpot=0.05, n_out=1),  # 1 token: TPOT unconstrained -> meets
        failed_record(4, 1.6, 2.0, "500"),
    ]
    s = summarize(records, warmup_s=0.0, slo=SLO(ttft_ms=200, tpot_ms=50), trace=False)
    window = max(r.finish_s for r in records if r.finish_s is not None)
    assert s["window_s"] == pytest.approx(window, abs=1e-4)
    assert s["goodput"]["requests_per_s"] == pytest.approx(2 / window, rel=1e-3)
    assert s["goodput"]["fraction"] == pytest.approx(2 / 5)
    assert s["throughput"]["requests_per_s"] == pytest.approx(4 / window, rel=1e-3)
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(31 / window, rel=1e-3)
    assert s["throughput"]["input_tokens_per_s"] == pytest.approx(400 / window, rel=1e-3)
    only_ttft = summarize(records, 0.0, SLO(ttft_ms=200), trace=False)["goodput"]
    assert only_ttft["fraction"] == pytest.approx(3 / 5)
    assert summarize(records, 0.0, SLO(), trace=False)["goodput"] is None
    with pytest.raises(ValueError, match="ttft_ms"):
        SLO(ttft_ms=0)


def test_latency_percentiles_and_counts_of_a_run() -> None:
    records = [ok_record(i, i * 0.1, ttft=0.01 * (i + 1), tpot=0.02, n_out=4) for i in range(10)]
    s = summarize(records, 0.0, SLO(), trace=False)
    assert s["latency_ms"]["ttft"]["n"] == 10
    assert s["latency_ms"]["ttft"]["p50"] == pytest.approx(55.0)
    assert s["latency_ms"]["ttft"]["p90"] == pytest.approx(91.0)
    assert s["latency_ms"]["tpot"]["p99"] == pytest.approx(20.0)
    assert s["latency_ms"]["itl"]["n"] == 30
    assert s["latency_ms"]["e2e"]["max"] == pytest.approx(160.0)
    assert s["counts"]["completed"] == 10 and s["counts"]["output_len_mismatch"] == 0


def test_warmup_excludes_requests_that_ended_during_it() -> None:
    records = [
        ok_record(0, 0.0, 0.1, 0.01, 5),  # ends at 0.14: excluded
        ok_record(1, 0.5, 0.1, 0.01, 5),  # starts in warm-up, ends at 0.64 after it: counted
        ok_record(2, 1.0, 0.1, 0.01, 5),
        failed_record(3, 0.0, 0.2, "500"),  # failed during warm-up: excluded too
    ]
    s = summarize(records, warmup_s=0.6, slo=SLO(), trace=False)
    assert s["counts"] == {
        "sent": 4, "measured": 2, "excluded_warmup": 2, "completed": 2, "failed": 0, "rejected": 0,
        "output_len_mismatch": 0, "without_usage": 0, "output_tokens": 10, "output_chunks": 10,
    }  # fmt: skip
    assert s["window_s"] == pytest.approx(1.14 - 0.6)
    assert s["errors"] == {}


def test_errors_by_status_and_rejections_apart() -> None:
    records = [
        ok_record(0, 0.0, 0.1, 0.01, 5),
        failed_record(1, 0.0, 0.1, "429", rejected=True),
        failed_record(2, 0.0, 0.1, "429", rejected=True),
        failed_record(3, 0.0, 0.1, "500"),
        failed_record(4, 0.0, 0.1, "timeout"),
        failed_record(5, 0.0, 0.1, "500"),
    ]
    s = summarize(records, 0.0, SLO(), trace=False)
    assert s["errors"] == {"500": 2, "timeout": 1} and s["rejections"] == {"429": 2}
    assert (s["counts"]["failed"], s["counts"]["rejected"], s["counts"]["completed"]) == (3, 2, 1)


def test_prefix_cache_ratios() -> None:
    records = [
        ok_record(0, 0.0, 0.1, 0.01, 2, prompt=100, cached=0),
        ok_record(1, 0.0, 0.1, 0.01, 2, 300, 150),
    ]
    records[1].output_tokens = 3  # the server returned another length than asked
    s = summarize(records, 0.0, SLO(), trace=True)
    pc = s["prefix_cache"]
    assert (pc["prompt_tokens"], pc["cached_tokens"], pc["best_cached_tokens"]) == (400, 150, 170)
    assert pc["measured_hit_ratio"] == pytest.approx(0.375) and pc["best_hit_ratio"] == pytest.approx(0.425)
    assert s["counts"]["output_len_mismatch"] == 1
    assert summarize(records, 0.0, SLO(), trace=False)["prefix_cache"]["best_hit_ratio"] is None


def test_in_flight_curve() -> None:
    records = [
        failed_record(0, 0.0, 2.0, "x"),
        failed_record(1, 1.0, 3.0, "x"),
        failed_record(2, 2.0, 2.5, "x"),
    ]
    times, counts = in_flight_curve(records)
    assert times == [0.0, 0.0, 1.0, 2.0, 2.0, 2.5, 3.0]
    assert counts == [0, 1, 2, 1, 2, 1, 0]  # at t=2 the finish is applied before the start


def test_report_shows_the_figures() -> None:
    records = [ok_record(i, i * 0.1, 0.05, 0.01, 4, cached=8) for i in range(5)]
    result = {
        "config": {"backend": "http", "url": "http://127.0.0.1:8000", "dataset": "trace"},
        "stopped_by": "dataset_end",
        "wall_s": 1.0,
        "trace": {"entries": 5, "span_s": 10.0, "replayed_span_s": 0.5, "scaled_block_size": 8,
                  "best_hit_ratio_unscaled": 0.4},
        "plots": ["p/latency_cdf.png"],
        "command": "k2serve bench serve --trace t.jsonl",
        **summarize(records, 0.0, SLO(ttft_ms=100), trace=True),
    }  # fmt: skip
    text = format_report(result)
    assert (
        "TTFT" in text and "goodput" in text and "measured hit 8.0%" in text and "best possible 18.0%" in text
    )
    assert "reproduce          k2serve bench serve --trace t.jsonl" in text
    assert "measured above best" not in text
    result["prefix_cache"] = {**result["prefix_cache"], "measured_hit_ratio": 0.9}
    assert "measured above best" in format_report(result)
