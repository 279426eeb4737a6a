"""One engine's Prometheus metrics under vLLM's names and labels, in a registry of its own.

Dashboards, KEDA triggers and endpoint pickers written for vLLM read these unchanged: every sample
carries `model_name` and `engine` (the worker id; "0" for `k2serve serve`) plus `role` (serve,
prefill or decode). Gauges are read from the engine's `BackendStats` at scrape time; the rest is
observed by the AsyncEngine as it delivers each request's tokens (see `RequestTimes`).

What a role counts, so that summing over the cluster counts each token once:
- prompt tokens: where the prompt is computed (a prefill worker, a decode worker's local prefill,
  `serve`), not where its KV arrives from elsewhere;
- generation tokens: where sampled (a prefill worker samples the first token, its decode worker the rest);
- TTFT: where the first token is sampled; ITL: between consecutive tokens of one engine (on a decode
  worker, from adopting the prefilled request to its second token, then token to token);
- e2e latency: from the engine's admission call to the request's end in that engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from k2serve.engine.protocol import BackendStats, KVTierStats

ROLES = ("serve", "prefill", "decode")
LABELS = ("model_name", "engine", "role")
# vLLM's buckets (vllm/v1/metrics/loggers.py), so histograms from both aggregate.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0,
)  # fmt: skip
REQUEST_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


@dataclass
class RequestTimes:
    """One request's timing inside an engine (monotonic seconds). `last_token` is None until the
    engine has a token of this request: a request continuing a prefill done elsewhere starts with
    `last_token` = its adoption, so its first token here is an inter-token gap, not a TTFT."""

    arrival: float
    last_token: float | None = None


class _SchedulerCollector(Collector):
    """The gauges and cumulative counters the engine keeps itself, read at scrape time."""

    def __init__(self, stats: Callable[[], BackendStats], labels: tuple[str, str, str]) -> None:
        self._stats = stats
        self._labels = list(labels)

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        for name, doc, value, kind in (
            ("vllm:num_requests_running", "Requests in the running batch.", s.num_running, "gauge"),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting, "gauge"),
            ("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", usage, "gauge"),
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_query_tokens, "c"),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_hit_tokens, "c"),
            ("vllm:num_preemptions", "Sequences preempted by recompute.", s.num_preemptions, "c"),
            ("vllm:spec_decode_num_drafts", "Speculative rows that verified drafts.", s.spec_num_drafts, "c"),
            ("vllm:spec_decode_num_draft_tokens", "Draft tokens verified.", s.spec_num_draft_tokens, "c"),
            ("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.", s.spec_num_accepted_tokens, "c"),
        ):  # fmt: skip
            family: GaugeMetricFamily | CounterMetricFamily
            if kind == "gauge":
                family = GaugeMetricFamily(name, doc, labels=LABELS)
            else:
                family = CounterMetricFamily(name, doc, labels=LABELS)
            family.add_metric(self._labels, value)
            yield family
        if s.kv_tiers is not None:
            yield from self._tier_metrics(s.kv_tiers, s.prefix_hit_tokens)

    def _tier_metrics(self, t: KVTierStats, prefix_hit_tokens: int) -> Iterator[Metric]:
        """k2serve_kv_* families of the local tiers and session leases (per tier: label `tier`)."""
        tier_labels = [*LABELS, "tier"]
        hits = CounterMetricFamily(
            "k2serve_kv_tier_hit_tokens",
            "Prefix-cache hit tokens by where the KV was found.",
            labels=tier_labels,
        )
        hits.add_metric([*self._labels, "device"], prefix_hit_tokens - sum(t.hit_tokens.values()))
        for tier, n in t.hit_tokens.items():
            hits.add_metric([*self._labels, tier], n)
        yield hits
        for name, doc, values in (
            ("k2serve_kv_offload_bytes", "Bytes of evicted KV blocks copied into a tier.", t.offload_bytes),
            ("k2serve_kv_offload_seconds", "Seconds spent copying KV blocks into a tier.", t.offload_seconds),
            ("k2serve_kv_reload_bytes", "Bytes of KV blocks reloaded from a tier.", t.reload_bytes),
            ("k2serve_kv_reload_seconds", "Seconds spent reloading KV blocks from a tier.", t.reload_seconds),
        ):
            family = CounterMetricFamily(name, doc, labels=tier_labels)
            for tier, v in values.items():
                family.add_metric([*self._labels, tier], v)
            yield family
        blocks = GaugeMetricFamily(
            "k2serve_kv_tier_blocks", "KV blocks a tier holds now.", labels=tier_labels
        )
        for tier, n in t.blocks.items():
            blocks.add_metric([*self._labels, tier], n)
        yield blocks
        corrupt = CounterMetricFamily(
            "k2serve_kv_tier_corrupt_blocks", "Tier entries dropped as corrupt or missing.", labels=LABELS
        )
        corrupt.add_metric(self._labels, t.corrupt_blocks)
        yield corrupt
        store_errors = CounterMetricFamily(
            "k2serve_kv_store_errors",
            "Shared KV store calls that failed or timed out (the blocks were recomputed).",
            labels=LABELS,
        )
        store_errors.add_metric(self._labels, t.store_errors)
        yield store_errors
        leased = GaugeMetricFamily(
            "k2serve_kv_leased_blocks", "KV blocks held by session leases (agent pauses).", labels=LABELS
        )
        leased.add_metric(self._labels, t.leased_blocks)
        yield leased
        for name, doc, value, kind in (
            (
                "k2serve_kv_offload_dropped",
                "Offloads dropped: the disk writer's queue was full.",
                t.dropped_offloads,
                "c",
            ),
            (
                "k2serve_kv_offload_queue_blocks",
                "Disk writes of offloaded KV blocks queued now.",
                t.write_queue_blocks,
                "g",
            ),
            (
                "k2serve_kv_reloads_in_flight",
                "Requests waiting for their asynchronous tier reload now.",
                t.reloads_in_flight,
                "g",
            ),
            (
                "k2serve_kv_reload_timeouts",
                "Asynchronous tier reloads given up (tokens recomputed).",
                t.reload_timeouts,
                "c",
            ),
        ):
            fam = (CounterMetricFamily if kind == "c" else GaugeMetricFamily)(name, doc, labels=LABELS)
            fam.add_metric(self._labels, value)
            yield fam


class EngineMetrics:
    """The registry of one engine (`registry`, served on /metrics or a worker's metrics port).

    The AsyncEngine calls `tokens` for each delivery of new tokens and `finished` once per request that
    ends (also by abort); the caller keeps the `RequestTimes`, so nothing per request is held here.
    Thread-safe (prometheus_client's metrics are)."""

    def __init__(self, model_name: str, role: str, engine: str, stats: Callable[[], BackendStats]) -> None:
        if role not in ROLES:
            raise ValueError(f"metrics role must be one of {ROLES}, got {role!r}")
        self.labels = (model_name, engine, role)
        self.registry = CollectorRegistry(auto_describe=True)
        r, lbl = self.registry, LABELS
        self._prompt = Counter("vllm:prompt_tokens", "Prompt tokens computed.", lbl, registry=r)
        self._generation = Counter("vllm:generation_tokens", "Tokens generated.", lbl, registry=r)
        self._success = Counter(
            "vllm:request_success", "Finished requests by reason.", [*lbl, "finished_reason"], registry=r
        )
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Arrival to first token.",
            lbl,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self._itl = Histogram(
            "vllm:inter_token_latency_seconds", "Time between tokens.", lbl, buckets=ITL_BUCKETS, registry=r
        )
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Arrival to the request's end.",
            lbl,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self._queue = Histogram(
            "vllm:request_queue_time_seconds",
            "Arrival to first scheduled.",
            lbl,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        r.register(_SchedulerCollector(stats, self.labels))
        # children bound once: observing is then one call each
        self._prompt_c = self._prompt.labels(*self.labels)
        self._generation_c = self._generation.labels(*self.labels)
        self._ttft_c = self._ttft.labels(*self.labels)
        self._itl_c = self._itl.labels(*self.labels)
        self._e2e_c = self._e2e.labels(*self.labels)
        self._queue_c = self._queue.labels(*self.labels)
        for reason in ("stop", "length", "abort"):  # exported at 0 from the start, as vLLM does
            self._success.labels(*self.labels, reason)

    def prompt_computed(self, num_tokens: int) -> None:
        self._prompt_c.inc(num_tokens)

    def tokens(self, times: RequestTimes, num_new: int, now: float | None = None) -> None:
        """`num_new` tokens of one request delivered at `now`: a TTFT for the request's first token
        here (tokens that came with it add no gap), else inter-token gaps spread evenly over them."""
        if num_new <= 0:
            return
        now = time.monotonic() if now is None else now
        self._generation_c.inc(num_new)
        if times.last_token is None:
            self._ttft_c.observe(now - times.arrival)
        else:
            gap = (now - times.last_token) / num_new
            for _ in range(num_new):
                self._itl_c.observe(gap)
        times.last_token = now

    def finished(
        self, times: RequestTimes, reason: str, queue_time: float | None, now: float | None = None
    ) -> None:
        """The request ended (`reason`: stop, length or abort); `queue_time` None when it was never scheduled."""
        now = time.monotonic() if now is None else now
        self._success.labels(*self.labels, reason).inc()
        self._e2e_c.observe(now - times.arrival)
        if queue_time is not None:
            self._queue_c.observe(queue_time)
