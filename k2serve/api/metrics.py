"""Prometheus metrics of one API app, in a registry of its own (several apps can share a process).

Latencies are measured where the client sees them (the HTTP layer); queue and KV-cache gauges are
read from `GenerationBackend.stats()` at scrape time. Over a local AsyncEngine (`k2serve serve`) the
engine's vLLM-named metrics (`k2serve.engine.metrics`) are served beside them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from k2serve.engine.async_engine import AsyncEngine
from k2serve.engine.protocol import GenerationBackend

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _BackendCollector(Collector):
    def __init__(self, backend: GenerationBackend) -> None:
        self._backend = backend

    def collect(self) -> Iterator[Metric]:
        s = self._backend.stats()
        yield GaugeMetricFamily("k2serve_requests_running", "Requests being generated.", value=s.num_running)
        yield GaugeMetricFamily(
            "k2serve_requests_waiting", "Requests queued for admission.", value=s.num_waiting
        )
        yield GaugeMetricFamily("k2serve_kv_blocks_used", "KV-cache blocks in use.", value=s.kv_blocks_used)
        yield GaugeMetricFamily(
            "k2serve_kv_blocks_total", "KV-cache blocks in the pool.", value=s.kv_blocks_total
        )
        yield GaugeMetricFamily(
            "k2serve_prefix_cache_hit_rate",
            "Prompt tokens served by the prefix cache / looked up.",
            value=s.prefix_hit_rate,
        )
        yield CounterMetricFamily(
            "k2serve_preemptions", "Sequences preempted by recompute.", value=s.num_preemptions
        )


class _SessionCollector(Collector):
    def __init__(self, sessions: Any) -> None:
        self._sessions = sessions

    def collect(self) -> Iterator[Metric]:
        n, blocks = self._sessions.kv_blocks()
        yield GaugeMetricFamily(
            "k2serve_sessions_holding_kv", "Sessions whose context a worker caches.", value=n
        )
        yield GaugeMetricFamily(
            "k2serve_session_kv_blocks", "KV-cache blocks held by sessions' cached contexts.", value=blocks
        )


class APIMetrics:
    """The app's metrics; `render()` is the /metrics body."""

    def __init__(self, backend: GenerationBackend, sessions: Any = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            "k2serve_time_to_first_token_seconds",
            "Arrival to first generated token.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "k2serve_inter_token_latency_seconds",
            "Time between generated tokens.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "k2serve_request_latency_seconds",
            "Arrival to response end.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "k2serve_requests",
            "Finished HTTP generation requests.",
            ["endpoint", "status", "finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "k2serve_prompt_tokens", "Prompt tokens of admitted requests.", registry=r
        )
        self.cached_tokens = Counter(
            "k2serve_cached_prompt_tokens", "Prompt tokens served by the prefix cache.", registry=r
        )
        self.generation_tokens = Counter("k2serve_generation_tokens", "Generated tokens.", registry=r)
        r.register(_BackendCollector(backend))
        if isinstance(backend, AsyncEngine):
            r.register(backend.metrics.registry)
        if sessions is not None:
            r.register(_SessionCollector(sessions))

    def tracker(self, endpoint: str) -> RequestTracker:
        return RequestTracker(self, endpoint)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Timing of one request. Call `tokens(n, num_prompt, num_cached)` per event, `finish(...)` once."""

    def __init__(self, metrics: APIMetrics, endpoint: str) -> None:
        self._m = metrics
        self._endpoint = endpoint
        self._start = time.monotonic()
        self._last: float | None = None
        self._prompt_counted = False
        self._done = False

    def tokens(self, n: int, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        now = time.monotonic()
        if not self._prompt_counted:
            self._prompt_counted = True
            self._m.prompt_tokens.inc(num_prompt_tokens)
            self._m.cached_tokens.inc(num_cached_tokens)
        if n <= 0:
            return
        if self._last is None:
            self._m.ttft.labels(self._endpoint).observe(now - self._start)  # tokens that came with it: no gap
        else:
            gap = (now - self._last) / n
            for _ in range(n):
                self._m.itl.labels(self._endpoint).observe(gap)
        self._last = now
        self._m.generation_tokens.inc(n)

    def finish(self, status: int, finish_reason: str | None) -> None:
        """Count the request once (later calls are ignored)."""
        if self._done:
            return
        self._done = True
        self._m.e2e.labels(self._endpoint).observe(time.monotonic() - self._start)
        self._m.requests.labels(self._endpoint, str(status), finish_reason or "none").inc()
