"""Which worker gets a request. Decision logic only: it sees workers' numbers and the KV index, never
calls them.

Policies (`--routing-policy`): `kv` (KVAware, the default) sends a prompt to the prefill worker with
the least predicted time to first token, counting the prefix its cache already holds; `least-loaded`
(LeastLoaded) to the worker with the fewest outstanding requests; `round-robin` (RoundRobin) in turn.
Decode workers are picked least-loaded by `kv` too; a session's holder is kept by the backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from k2serve.kvcache.hashing import chain_hashes
from k2serve.router.kv_index import KVIndex
from k2serve.router.registry import Worker

POLICIES = ("kv", "least-loaded", "round-robin")
# Prefill speed assumed for a worker that has not measured one yet (and no other worker has either):
# any positive value gives the same choice when no worker has a measurement (it scales every score).
DEFAULT_PREFILL_TOKENS_PER_S = 1000.0
# What reloading a prompt token from a worker's tier costs, as a fraction of computing it there, until
# the worker reports a measured reload speed for that tier (WorkerLoad.reload_tokens_per_s): cheaper than
# recomputing, not free. A tier not named here counts as "shared".
DEFAULT_RELOAD_COST = {"host": 0.05, "disk": 0.2, "shared": 0.3}


class NoWorkerError(LookupError):
    """No live worker of the role; carries the role."""

    def __init__(self, role: str) -> None:
        super().__init__(f"no {role} worker is available")
        self.role = role


@dataclass(frozen=True)
class Choice:
    """A routing decision. reason (the label of k2serve_router_routing_decisions_total): prefix_hit
    (chosen for, or with, cached blocks of the prompt), load (by load or predicted TTFT, no cached
    block), round_robin, only_worker (one candidate), session (the session's holder, kept).
    cached_tokens: the prompt tokens the index predicts the worker's cache holds."""

    worker: Worker
    reason: str
    cached_tokens: int = 0
    predicted_ttft_s: float | None = None


class PromptBlocks:
    """A prompt's chain hashes (k2serve.kvcache.hashing), computed at most once per block size per request.
    Only the blocks a worker can serve from its cache count: at most (len - 1) // block_size, as
    BlockManager.allocate always computes the last token."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = token_ids
        self._hashes: dict[int, list[int]] = {}

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def hashes(self, block_size: int) -> list[int]:
        if block_size not in self._hashes:
            self._hashes[block_size] = chain_hashes(self.token_ids[: len(self.token_ids) - 1], block_size)
        return self._hashes[block_size]


def live_workers(workers: Sequence[Worker], role: str, exclude: frozenset[str]) -> list[Worker]:
    """`workers` not in `exclude`; NoWorkerError(role) when none is left."""
    live = [w for w in workers if w.worker_id not in exclude]
    if not live:
        raise NoWorkerError(role)
    return live


def load_key(w: Worker) -> tuple[int, int, int, str]:
    """Least loaded first: fewest outstanding requests (the router's in-flight count plus the worker's
    last reported queue), then most free KV blocks, then fewest requests routed to it so far (idle
    workers take turns), then id (deterministic)."""
    return (w.in_flight + w.load.waiting, -w.load.free_blocks, w.routed, w.worker_id)


class RoutingPolicy:
    """Base: `choose(workers, role, exclude, prompt)` returns one of `workers` (all of `role`), never one
    in `exclude`, with the reason; `pick` the worker alone."""

    reason = "load"

    def pick(self, workers: Sequence[Worker], role: str, exclude: frozenset[str] = frozenset()) -> Worker:
        raise NotImplementedError

    def choose(
        self,
        workers: Sequence[Worker],
        role: str,
        exclude: frozenset[str] = frozenset(),
        prompt: PromptBlocks | None = None,
    ) -> Choice:
        live = live_workers(workers, role, exclude)
        return Choice(self.pick(live, role), "only_worker" if len(live) == 1 else self.reason)

    def prefilled(self, worker: Worker, prompt: PromptBlocks) -> None:
        """`worker` (still registered) has just prefilled `prompt`: a policy may learn from it."""


class LeastLoaded(RoutingPolicy):
    """The least loaded worker (`load_key`)."""

    def pick(self, workers: Sequence[Worker], role: str, exclude: frozenset[str] = frozenset()) -> Worker:
        return min(live_workers(workers, role, exclude), key=load_key)


class RoundRobin(RoutingPolicy):
    """Each role's live workers in turn (by id), whatever their load or cache."""

    reason = "round_robin"

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def pick(self, workers: Sequence[Worker], role: str, exclude: frozenset[str] = frozenset()) -> Worker:
        live = sorted(live_workers(workers, role, exclude), key=lambda w: w.worker_id)
        i = self._next.get(role, 0)
        self._next[role] = i + 1
        return live[i % len(live)]


def predicted_ttft_s(
    queued_tokens: int, prompt_tokens: int, cached_tokens: int, tokens_per_s: float, reload_s: float = 0.0
) -> float:
    """Seconds until a prompt's first token on a prefill worker: its queued prefill work, then this
    prompt's uncached tokens, both at the worker's prefill speed, plus `reload_s` to bring the cached
    tokens held in a tier below its pool back (see `reload_seconds`)."""
    return (queued_tokens + prompt_tokens - cached_tokens) / tokens_per_s + reload_s


def reload_seconds(
    tiers: Sequence[str],
    block_size: int,
    prefill_tokens_per_s: float,
    measured: dict[str, float] | None = None,
    cost: dict[str, float] | None = None,
) -> float:
    """Seconds to reload the cached blocks in `tiers` (one tier name per block; "device" is free): a
    tier's measured reload speed (tokens/s, `measured`) where the worker reported one, else its `cost`
    (DEFAULT_RELOAD_COST: a fraction of recomputing at `prefill_tokens_per_s`)."""
    cost = DEFAULT_RELOAD_COST if cost is None else cost
    total = 0.0
    for tier in tiers:
        if tier == "device":
            continue
        rate = (measured or {}).get(tier, 0.0)
        if rate > 0:
            total += block_size / rate
        else:
            total += block_size * cost.get(tier, cost.get("shared", 1.0)) / prefill_tokens_per_s
    return total


class KVAware(LeastLoaded):
    """Prefill worker = argmin over the candidates of predicted TTFT (`predicted_ttft_s`):

        (queued prefill tokens + prompt tokens - tokens of the prompt's prefix cached there) / its speed
        + the time to reload the cached blocks that are in a tier below its pool (`reload_seconds`)

    queued: the larger of what the worker last reported and the uncached tokens the router has sent it
    and not seen answered (fresher between heartbeats). speed: the worker's measured prefill tokens/s;
    before it has one, the mean of the candidates' measured speeds (DEFAULT_PREFILL_TOKENS_PER_S when
    none has). Cached tokens and their tiers come from `index` (only for workers that publish KV
    events); a tier's reload speed is the worker's measured one, else `reload_cost` (a fraction of
    recomputing, DEFAULT_RELOAD_COST). Ties go to more cached tokens, then `load_key`. Decode workers
    (and prefill without a prompt) are least loaded."""

    def __init__(self, index: KVIndex, reload_cost: dict[str, float] | None = None) -> None:
        self.index = index
        self.reload_cost = DEFAULT_RELOAD_COST if reload_cost is None else reload_cost

    def choose(
        self,
        workers: Sequence[Worker],
        role: str,
        exclude: frozenset[str] = frozenset(),
        prompt: PromptBlocks | None = None,
    ) -> Choice:
        if role != "prefill" or prompt is None:
            return super().choose(workers, role, exclude, prompt)
        live = live_workers(workers, role, exclude)
        tiers = self._cached_tiers(live, prompt)
        measured = [w.load.prefill_tokens_per_s for w in live if w.load.prefill_tokens_per_s > 0]
        fallback = sum(measured) / len(measured) if measured else DEFAULT_PREFILL_TOKENS_PER_S
        cached: dict[str, int] = {}
        scored = []
        for w in live:
            queued = max(w.load.queued_prefill_tokens, w.prefill_tokens)
            speed = w.load.prefill_tokens_per_s if w.load.prefill_tokens_per_s > 0 else fallback
            held = tiers[w.worker_id]
            cached[w.worker_id] = len(held) * w.info.block_size
            reload_s = reload_seconds(
                held, w.info.block_size, speed, dict(w.load.reload_tokens_per_s), self.reload_cost
            )
            ttft = predicted_ttft_s(queued, prompt.num_tokens, cached[w.worker_id], speed, reload_s)
            scored.append((ttft, -cached[w.worker_id], load_key(w), w))
        ttft, minus_cached, _, best = min(scored, key=lambda s: s[:3])
        reason = "only_worker" if len(live) == 1 else "prefix_hit" if minus_cached < 0 else "load"
        return Choice(best, reason, -minus_cached, ttft)

    def prefilled(self, worker: Worker, prompt: PromptBlocks) -> None:
        """The worker's prefix cache now holds the prompt's blocks: place them in the index at once, not a
        heartbeat later, so the next turn of a fast agent loop finds them. Its KV events still follow
        (and remove what it evicts); a block evicted before this runs misleads at most one request,
        whose prefill computes and caches it again."""
        if worker.info.publishes_kv_events and worker.info.block_size > 0:
            hashes = prompt.hashes(worker.info.block_size)
            self.index.apply(worker.worker_id, hashes, [False] * len(hashes))

    def _cached_tiers(self, workers: Sequence[Worker], prompt: PromptBlocks) -> dict[str, list[str]]:
        """worker id -> the tier of each leading prompt block the index places in its cache (none for
        workers without KV events)."""
        out: dict[str, list[str]] = {w.worker_id: [] for w in workers}
        by_size: dict[int, list[str]] = {}
        for w in workers:
            if w.info.publishes_kv_events and w.info.block_size > 0:
                by_size.setdefault(w.info.block_size, []).append(w.worker_id)
        for size, ids in by_size.items():
            out |= self.index.cached_tiers(prompt.hashes(size), ids)
        return out


def make_policy(name: str, index: KVIndex) -> RoutingPolicy:
    """The policy `--routing-policy name` selects (POLICIES)."""
    if name == "kv":
        return KVAware(index)
    if name == "least-loaded":
        return LeastLoaded()
    if name == "round-robin":
        return RoundRobin()
    raise ValueError(f"--routing-policy must be one of {', '.join(POLICIES)}, got {name!r}")
