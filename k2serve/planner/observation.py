"""What the planner sees: an `Observation` built from the router's `/metrics` (Prometheus text) and
`/cluster/workers` (JSON), plus the replica counts the connector reports. Parsing only; no I/O here.

Latency histograms are cumulative since the router started; the planner wants the recent past, so a
quantile is taken over the difference of two scrapes (`Histogram.minus`), as Prometheus'
`histogram_quantile(q, rate(...))` would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

TTFT = "k2serve_time_to_first_token_seconds"
ITL = "k2serve_inter_token_latency_seconds"
GAUGES = (
    "k2serve_requests_waiting",
    "k2serve_requests_running",
    "k2serve_kv_blocks_used",
    "k2serve_kv_blocks_total",
)


class MetricsError(ValueError):
    """The router's metrics could not be read or parsed; `source` names where they came from."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class Histogram:
    """A cumulative histogram: `buckets` are (upper bound, observations <= bound), bounds increasing and
    ending with +inf; counts may be fractional (the simulator observes with weights)."""

    buckets: tuple[tuple[float, float], ...]

    @property
    def count(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0

    def minus(self, earlier: Histogram | None) -> Histogram:
        """The observations since `earlier` (same bounds). A counter reset (the router restarted: some
        count went down) or different bounds give `self` whole."""
        if earlier is None or [b for b, _ in earlier.buckets] != [b for b, _ in self.buckets]:
            return self
        diff = tuple((b, c - e) for (b, c), (_, e) in zip(self.buckets, earlier.buckets, strict=True))
        return self if any(c < 0 for _, c in diff) else Histogram(diff)

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0 < q < 1) by linear interpolation inside its bucket, like Prometheus'
        `histogram_quantile`; one in the +inf bucket is the largest finite bound. None when empty."""
        total = self.count
        if total <= 0:
            return None
        rank = q * total
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in self.buckets:
            if count >= rank:
                if math.isinf(bound):
                    return lower_bound
                if count == lower_count:
                    return bound
                return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
            lower_bound, lower_count = bound, count
        return lower_bound


@dataclass(frozen=True)
class RouterMetrics:
    """One scrape of the router's /metrics: latency histograms summed over endpoints, and the gauges."""

    ttft: Histogram
    itl: Histogram
    requests_waiting: int
    requests_running: int
    kv_blocks_used: int
    kv_blocks_total: int


def _histogram(samples: Sequence, name: str) -> Histogram:
    by_bound: dict[float, float] = {}
    for s in samples:
        if s.name == f"{name}_bucket":
            bound = float(s.labels["le"])
            by_bound[bound] = by_bound.get(bound, 0.0) + s.value
    return Histogram(tuple(sorted(by_bound.items())))


def parse_metrics(text: str, source: str = "/metrics") -> RouterMetrics:
    """Parse a Prometheus text exposition of the router. A missing gauge raises MetricsError (this is
    not a k2serve router); a histogram with no samples yet (no request served) is empty."""
    try:
        families = {f.name: f for f in text_string_to_metric_families(text)}
    except ValueError as e:
        raise MetricsError(source, f"not a Prometheus text exposition ({e})") from e
    gauges: dict[str, int] = {}
    for name in GAUGES:
        fam = families.get(name)
        if fam is None or not fam.samples:
            raise MetricsError(source, f"gauge {name} is missing")
        gauges[name] = int(sum(s.value for s in fam.samples))
    hists = {}
    for name in (TTFT, ITL):
        fam = families.get(name)
        hists[name] = _histogram(fam.samples if fam is not None else [], name)
    return RouterMetrics(
        ttft=hists[TTFT],
        itl=hists[ITL],
        requests_waiting=gauges["k2serve_requests_waiting"],
        requests_running=gauges["k2serve_requests_running"],
        kv_blocks_used=gauges["k2serve_kv_blocks_used"],
        kv_blocks_total=gauges["k2serve_kv_blocks_total"],
    )


@dataclass(frozen=True)
class RoleLoad:
    """One role's load. replicas: the connector's target count (what the planner changes); ready: the
    role's workers registered with the router (fewer while new ones start); in_flight: requests the router
    has outstanding on them; running / waiting: requests their engines run / queue; kv_used: fraction
    of their KV blocks in use, None when they report no blocks."""

    replicas: int
    ready: int
    in_flight: int = 0
    running: int = 0
    waiting: int = 0
    kv_used: float | None = None


def role_load(workers: Mapping, role: str, replicas: int) -> RoleLoad:
    """Sum the `/cluster/workers` JSON (`{"workers": [{"role", "in_flight", "running", "waiting",
    "free_blocks", "total_blocks"}, ...]}`) over the workers of `role`."""
    try:
        ws = [w for w in workers["workers"] if w["role"] == role]
        total = sum(int(w["total_blocks"]) for w in ws)
        free = sum(int(w["free_blocks"]) for w in ws)
        return RoleLoad(
            replicas=replicas,
            ready=len(ws),
            in_flight=sum(int(w["in_flight"]) for w in ws),
            running=sum(int(w["running"]) for w in ws),
            waiting=sum(int(w["waiting"]) for w in ws),
            kv_used=(total - free) / total if total > 0 else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise MetricsError("/cluster/workers", f"unexpected worker entry ({e!r})") from e


@dataclass(frozen=True)
class Observation:
    """What `Planner.decide` acts on. ttft_s / itl_s: the configured quantile of time to first token /
    inter-token latency over the last `window_s` seconds, None when nothing was observed in it."""

    prefill: RoleLoad
    decode: RoleLoad
    ttft_s: float | None
    itl_s: float | None
    window_s: float

    def role(self, role: str) -> RoleLoad:
        return self.prefill if role == "prefill" else self.decode


def observe(
    metrics: RouterMetrics,
    previous: RouterMetrics | None,
    workers: Mapping,
    replicas: Mapping[str, int],
    quantile: float,
    window_s: float,
) -> Observation:
    """Build an Observation from this scrape, the previous one (None: the histograms since start count)
    and the connector's replica counts."""
    return Observation(
        prefill=role_load(workers, "prefill", replicas["prefill"]),
        decode=role_load(workers, "decode", replicas["decode"]),
        ttft_s=metrics.ttft.minus(previous.ttft if previous else None).quantile(quantile),
        itl_s=metrics.itl.minus(previous.itl if previous else None).quantile(quantile),
        window_s=window_s,
    )
