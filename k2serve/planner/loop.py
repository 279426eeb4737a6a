"""The live planner: every interval, observe -> decide -> apply, and print the timeline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from k2serve.planner.connector import Connector, ConnectorError, apply
from k2serve.planner.observation import MetricsError, Observation
from k2serve.planner.policy import Decision, Planner
from k2serve.planner.simulate import TimelineRow


def run_planner(
    planner: Planner,
    observe: Callable[[], Observation],
    connector: Connector,
    interval_s: float,
    stop: threading.Event,
    emit: Callable[[str], None] = print,
    verbose: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> list[Decision]:
    """Run until `stop` is set, one round every `interval_s` seconds; returns the decisions made.

    A round observes, decides and applies the decision through `connector`; `emit` gets a timeline line
    (seconds since the start, replica counts, reason) for every change, for every hold when `verbose`,
    and for every MetricsError or ConnectorError, after which the round is skipped (the next one tries
    again: an unreachable router or API server must not stop the planner). Other errors propagate.
    """
    start = clock()
    decisions = []
    while not stop.is_set():
        t = clock() - start
        try:
            obs = observe()
            decision = planner.decide(obs, t)
            decisions.append(decision)
            apply(decision, connector)
            if decision.changed or verbose:
                row = TimelineRow(t, decision.prefill.target, decision.decode.target, decision.reason)
                emit(row.format())
        except (MetricsError, ConnectorError) as e:
            emit(f"{t:9.1f} s  round skipped: {type(e).__name__}: {e}")
        stop.wait(max(0.0, interval_s - (clock() - start - t)))
    return decisions
