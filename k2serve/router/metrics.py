"""The router's own k2serve_* metrics, read at scrape time: registered workers by role and state, and
requests refused at admission by reason. Added to the router's /metrics beside the API app's."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from k2serve.router.backend import ClusterBackend
from k2serve.router.registry import WorkerTable


class RouterCollector(Collector):
    def __init__(self, backend: ClusterBackend, table: WorkerTable) -> None:
        self._backend = backend
        self._table = table

    def collect(self) -> Iterator[Metric]:
        model = self._backend.model_name
        workers = GaugeMetricFamily(
            "k2serve_workers",
            "Registered workers by role and state (ready: gets requests; draining: deregistered, finishing).",
            labels=["model_name", "role", "state"],
        )
        for role in ("prefill", "decode"):
            of_role = [w for w in self._table.workers.values() if w.role == role]
            draining = sum(w.draining_since is not None for w in of_role)
            workers.add_metric([model, role, "ready"], len(of_role) - draining)
            workers.add_metric([model, role, "draining"], draining)
        yield workers
        rejections = CounterMetricFamily(
            "k2serve_admission_rejections",
            "Requests refused at admission (429): queue_full at --max-queue in flight, predicted_ttft over --max-ttft-ms.",
            labels=["model_name", "reason"],
        )
        rejections.add_metric([model, "queue_full"], self._backend.rejected_queue_full)
        rejections.add_metric([model, "predicted_ttft"], self._backend.rejected)
        yield rejections
