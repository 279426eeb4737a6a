"""The planner's view of the router: parsing the real Prometheus exposition of `APIMetrics`, windowed
histogram quantiles, /cluster/workers sums, and the HTTP scraper (against an httpx mock transport)."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from k2serve.api.metrics import APIMetrics
from k2serve.engine.protocol import BackendStats
from k2serve.planner.observation import Histogram, MetricsError, observe, parse_metrics, role_load
from k2serve.planner.scrape import RouterScraper

WORKERS = {
    "workers": [
        {"worker_id": "prefill-0", "role": "prefill", "in_flight": 3, "running": 2, "waiting": 5,
         "free_blocks": 0, "total_blocks": 0},
        {"worker_id": "decode-0", "role": "decode", "in_flight": 4, "running": 4, "waiting": 1,
         "free_blocks": 30, "total_blocks": 100},
        {"worker_id": "decode-1", "role": "decode", "in_flight": 2, "running": 2, "waiting": 0,
         "free_blocks": 50, "total_blocks": 100},
    ]
}  # fmt: skip


class _Backend:
    """Just enough of a GenerationBackend for APIMetrics: fixed stats."""

    def stats(self) -> BackendStats:
        return BackendStats(
            num_running=6, num_waiting=5, kv_blocks_used=120, kv_blocks_total=200, prefix_hit_rate=0.25,
            num_preemptions=0,
        )  # fmt: skip


def _metrics_with(ttfts: list[float], itls: list[float]) -> APIMetrics:
    m = APIMetrics(_Backend())  # type: ignore[arg-type]
    for i, x in enumerate(ttfts):
        m.ttft.labels("chat" if i % 2 else "completions").observe(x)  # two endpoints: summed
    for x in itls:
        m.itl.labels("completions").observe(x)
    return m


def test_parse_the_real_exposition_of_the_router_metrics() -> None:
    m = _metrics_with([0.2] * 9 + [3.0], [0.02] * 100)
    r = parse_metrics(m.render().decode())
    assert (r.requests_waiting, r.requests_running) == (5, 6)
    assert (r.kv_blocks_used, r.kv_blocks_total) == (120, 200)
    assert r.ttft.count == 10 and r.itl.count == 100
    assert r.ttft.buckets[-1][0] == math.inf
    p50 = r.ttft.quantile(0.5)
    assert p50 is not None and 0.1 < p50 <= 0.25  # inside the (0.1, 0.25] bucket
    p99 = r.ttft.quantile(0.99)
    assert p99 is not None and 2.5 < p99 <= 5.0


def test_no_request_yet_gives_empty_histograms_and_no_quantile() -> None:
    r = parse_metrics(_metrics_with([], []).render().decode())
    assert r.ttft.count == 0 and r.ttft.quantile(0.9) is None


def test_window_quantile_covers_only_the_observations_since_the_previous_scrape() -> None:
    m = _metrics_with([0.05] * 100, [])
    before = parse_metrics(m.render().decode())
    for _ in range(10):
        m.ttft.labels("chat").observe(7.0)
    after = parse_metrics(m.render().decode())
    assert after.ttft.quantile(0.9) is not None and after.ttft.quantile(0.9) < 0.1  # whole life: fast
    window = after.ttft.minus(before.ttft)
    assert window.count == 10
    q = window.quantile(0.9)
    assert q is not None and 5.0 < q <= 10.0
    # A restarted router (counts went down) is taken whole rather than as negative counts.
    assert before.ttft.minus(after.ttft) is before.ttft


def test_quantile_interpolates_and_saturates_at_the_largest_finite_bound() -> None:
    h = Histogram(((1.0, 0.0), (2.0, 10.0), (math.inf, 10.0)))
    assert h.quantile(0.5) == pytest.approx(1.5)
    top = Histogram(((1.0, 0.0), (2.0, 1.0), (math.inf, 10.0)))
    assert top.quantile(0.9) == 2.0


def test_missing_gauge_and_garbage_raise_metrics_error() -> None:
    with pytest.raises(MetricsError, match="k2serve_requests_waiting"):
        parse_metrics("# TYPE other gauge\nother 1\n", "http://r/metrics")
    with pytest.raises(MetricsError, match="http://r/metrics"):
        parse_metrics("this is { not prometheus\n", "http://r/metrics")


def test_role_load_sums_the_workers_of_a_role() -> None:
    dec = role_load(WORKERS, "decode", replicas=3)
    assert (dec.replicas, dec.ready, dec.running, dec.waiting, dec.in_flight) == (3, 2, 6, 1, 6)
    assert dec.kv_used == pytest.approx(0.6)
    pre = role_load(WORKERS, "prefill", replicas=1)
    assert pre.kv_used is None and pre.waiting == 5
    with pytest.raises(MetricsError, match="cluster/workers"):
        role_load({"workers": [{"role": "decode"}]}, "decode", 1)


def test_observe_builds_the_planner_input() -> None:
    m = parse_metrics(_metrics_with([1.0], [0.01]).render().decode())
    o = observe(m, None, WORKERS, {"prefill": 1, "decode": 2}, 0.9, 5.0)
    assert o.prefill.replicas == 1 and o.decode.replicas == 2
    assert o.ttft_s is not None and o.itl_s is not None and o.window_s == 5.0


def test_scraper_reads_both_endpoints_and_windows_the_histograms() -> None:
    m = _metrics_with([0.05] * 20, [0.01] * 20)
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/metrics":
            return httpx.Response(200, content=m.render())
        if request.url.path == "/cluster/workers":
            return httpx.Response(200, content=json.dumps(WORKERS))
        return httpx.Response(404)

    clock = iter([100.0, 105.0])
    scraper = RouterScraper(
        "http://router:8000/",
        {"prefill": 1, "decode": 2}.__getitem__,
        quantile=0.9,
        client=httpx.Client(transport=httpx.MockTransport(handler)),
        clock=lambda: next(clock),
    )
    first = scraper.observe()
    assert first.ttft_s is not None and first.ttft_s < 0.1 and first.window_s == 0.0
    for _ in range(5):
        m.ttft.labels("chat").observe(4.0)
    second = scraper.observe()
    assert second.window_s == 5.0
    assert second.ttft_s is not None and 2.5 < second.ttft_s <= 5.0
    assert second.itl_s is None  # no inter-token latency observed in the window
    assert second.decode.replicas == 2 and second.decode.ready == 2
    assert seen == ["/metrics", "/cluster/workers"] * 2


def test_scraper_errors_name_the_url() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="draining")

    scraper = RouterScraper(
        "http://router:8000", lambda r: 1, 0.9, client=httpx.Client(transport=httpx.MockTransport(handler))
    )
    with pytest.raises(MetricsError, match=r"http://router:8000/metrics: HTTP 503"):
        scraper.observe()
