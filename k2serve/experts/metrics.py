"""An expert-parallel rank's metrics (k2serve_ep_*), read at scrape time from its EPWorker: time in
all-to-all collectives, and per MoE layer the load imbalance its own tokens' routing implies under the
current placement (max / mean of the per-rank loads, 1 = balanced) since the last re-placement; the
count of EPLB re-placements, and the group's imbalance per MoE layer before and after the last one."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from k2serve.engine.metrics import LABELS
from k2serve.experts.eplb import imbalance as load_imbalance
from k2serve.experts.worker import EPWorker


class EPCollector(Collector):
    """`labels`: the engine's (model_name, engine, role). Reads plain counters the engine thread
    updates: a scrape may see one step's counts half added, never a torn number."""

    def __init__(self, worker: EPWorker, labels: tuple[str, str, str]) -> None:
        self._worker = worker
        self._labels = list(labels)

    def collect(self) -> Iterator[Metric]:
        comm = self._worker.comm
        seconds = CounterMetricFamily(
            "k2serve_ep_all_to_all_seconds", "Time in expert-parallel all-to-all collectives.", labels=LABELS
        )
        seconds.add_metric(self._labels, comm.all_to_all_seconds)
        yield seconds
        calls = CounterMetricFamily(
            "k2serve_ep_all_to_all", "Expert-parallel all-to-all collectives.", labels=LABELS
        )
        calls.add_metric(self._labels, comm.all_to_all_count)
        yield calls
        imbalance = GaugeMetricFamily(
            "k2serve_ep_load_imbalance",
            "Max / mean routed load per rank of this rank's tokens, per MoE layer (1 = balanced).",
            labels=[*LABELS, "moe_layer"],
        )
        counts = self._worker.load.counts.cpu().clone()  # [L, E]
        for layer, placement in enumerate(self._worker.placement):
            imbalance.add_metric([*self._labels, str(layer)], load_imbalance(placement, counts[layer]))
        yield imbalance
        rebalances = CounterMetricFamily(
            "k2serve_ep_eplb_rebalances", "EPLB re-placements of the routed experts applied.", labels=LABELS
        )
        rebalances.add_metric(self._labels, self._worker.rebalances)
        yield rebalances
        for when, values in (
            ("before", self._worker.imbalance_before),
            ("after", self._worker.imbalance_after),
        ):
            gauge = GaugeMetricFamily(
                f"k2serve_ep_eplb_imbalance_{when}",
                f"Max / mean load per rank of the group's windowed routed load {when} the last EPLB "
                "re-placement of each MoE layer (1 = balanced; absent until the layer moved once).",
                labels=[*LABELS, "moe_layer"],
            )
            for layer, value in sorted(values.items()):
                gauge.add_metric([*self._labels, str(layer)], value)
            yield gauge
