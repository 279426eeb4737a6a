"""KV transfer metrics (k2serve_kv_transfer_*, vLLM has no names for them), by backend; a prefill worker
counts what it sent, a decode worker what it received (the `role` label tells the sides apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from k2serve.engine.metrics import LABELS
from k2serve.transfer.base import TransferStats

TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class KVTransferMetrics:
    """Registered in an engine's `registry` with its (model_name, engine, role) `labels`."""

    def __init__(self, registry: CollectorRegistry, labels: tuple[str, str, str]) -> None:
        lbl = [*LABELS, "backend"]
        self._labels = labels
        self._bytes = Counter(
            "k2serve_kv_transfer_bytes", "Latent KV payload bytes moved.", lbl, registry=registry
        )
        self._seconds = Histogram(
            "k2serve_kv_transfer_seconds",
            "Wall time of one transfer (sender: open to acknowledged; receiver: expected to complete).",
            lbl,
            buckets=TRANSFER_BUCKETS,
            registry=registry,
        )
        self._failures = Counter(
            "k2serve_kv_transfer_failures",
            "Transfers that failed (unreachable, lost, timed out, corrupt).",
            lbl,
            registry=registry,
        )

    def done(self, backend: str, stats: TransferStats) -> None:
        self._bytes.labels(*self._labels, backend).inc(stats.bytes)
        self._seconds.labels(*self._labels, backend).observe(stats.seconds)

    def failed(self, backend: str) -> None:
        self._failures.labels(*self._labels, backend).inc()

    def declare(self, backend: str) -> None:
        """Export the backend's series at 0 before its first transfer (alerts see a series to rate)."""
        self._bytes.labels(*self._labels, backend)
        self._seconds.labels(*self._labels, backend)
        self._failures.labels(*self._labels, backend)
