"""Which worker gets a request. Decision logic only: it sees workers' numbers, never calls them."""

from __future__ import annotations

from collections.abc import Sequence

from k2serve.router.registry import Worker


class NoWorkerError(LookupError):
    """No live worker of the role; carries the role."""

    def __init__(self, role: str) -> None:
        super().__init__(f"no {role} worker is available")
        self.role = role


class RoutingPolicy:
    """Base: `pick(workers, role, exclude)` returns one of `workers` (all of `role`), never one in `exclude`."""

    def pick(self, workers: Sequence[Worker], role: str, exclude: frozenset[str] = frozenset()) -> Worker:
        raise NotImplementedError


class LeastLoaded(RoutingPolicy):
    """Fewest outstanding requests (the router's own in-flight count plus the worker's last reported queue),
    then most free KV blocks, then id (deterministic)."""

    def pick(self, workers: Sequence[Worker], role: str, exclude: frozenset[str] = frozenset()) -> Worker:
        live = [w for w in workers if w.worker_id not in exclude]
        if not live:
            raise NoWorkerError(role)
        return min(live, key=lambda w: (w.in_flight + w.load.waiting, -w.load.free_blocks, w.worker_id))
