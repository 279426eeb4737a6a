"""The router's own k2serve_* metrics, read at scrape time: registered workers by role and state,
requests refused at admission by reason, routing decisions by reason with the prefix-cache tokens they
predicted and got, and the KV index's size. Added to the router's /metrics beside the API app's."""

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
        yield from self._routing(model)

    def _routing(self, model: str) -> Iterator[Metric]:
        b = self._backend
        decisions = CounterMetricFamily(
            "k2serve_router_routing_decisions",
            "Workers chosen, by role and reason: prefix_hit (the prompt's prefix is cached there), load "
            "(least predicted TTFT or load, nothing cached), cache_balance (a new conversation: where it evicts "
            "the coldest cached blocks), round_robin, only_worker, session (its holder); "
            "decode under kv: tpot (least predicted TPOT), kv_pressure (some worker's free KV could not hold "
            "the request), no_kv_fit (none could).",
            labels=["model_name", "role", "reason"],
        )
        for (role, reason), n in sorted(b.routing_decisions.items()):
            decisions.add_metric([model, role, reason], n)
        yield decisions
        yield _counter(
            "k2serve_router_predicted_hit_tokens",
            "Prompt tokens the KV index predicted cached on the chosen prefill workers.",
            model,
            b.predicted_hit_tokens,
        )
        yield _counter(
            "k2serve_router_prefill_cached_tokens",
            "Prompt tokens the chosen prefill workers found in their prefix caches (as they reported).",
            model,
            b.prefill_cached_tokens,
        )
        index = self._table.kv_index
        blocks = GaugeMetricFamily(
            "k2serve_router_kv_index_blocks",
            "Prefix-cache blocks the router's KV index places on each worker (from its KV events).",
            labels=["model_name", "worker_id"],
        )
        for worker_id in sorted(index.workers()):
            blocks.add_metric([model, worker_id], index.blocks_of(worker_id))
        yield blocks
        yield _counter(
            "k2serve_router_kv_index_forgotten_blocks",
            f"Hashes the KV index forgot to stay within --kv-index-max-blocks ({index.max_blocks}).",
            model,
            index.forgotten,
        )


def _counter(name: str, documentation: str, model: str, value: float) -> CounterMetricFamily:
    counter = CounterMetricFamily(name, documentation, labels=["model_name"])
    counter.add_metric([model], value)
    return counter
