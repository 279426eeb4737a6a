"""Which worker gets a request. Decision logic only: it sees workers' numbers and the KV index, never
calls them.

Policies (`--routing-policy`): `kv` (KVAware, the default) sends a prompt to the prefill worker with
the least predicted time to first token, counting the prefix its cache already holds, and a request to
the decode worker with the least predicted time per output token among those whose free KV can hold
its context; `least-loaded` (LeastLoaded) to the worker with the fewest outstanding requests;
`round-robin` (RoundRobin) in turn; `kv-ttft` is `kv` without its cache balance (new conversations by
predicted TTFT alone, as `kv` was before it: kept to compare); `kv-settled` is `kv` counting only the
blocks the index places, not those a prefill in flight is computing (as `kv` was before it: kept to
compare). A session's holder is kept by the backend."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from k2serve.kvcache.hashing import chain_hashes
from k2serve.router.kv_index import DEVICE, SHARED, KVIndex
from k2serve.router.registry import Worker

POLICIES = ("kv", "kv-ttft", "kv-settled", "least-loaded", "round-robin")
# Prefill speed assumed for a worker that has not measured one yet (and no other worker has either):
# any positive value gives the same choice when no worker has a measurement (it scales every score).
DEFAULT_PREFILL_TOKENS_PER_S = 1000.0
# Decode step time assumed for a worker that has not measured one (and no other worker has either): as
# above, any positive value gives the same choice when none has a measurement.
DEFAULT_DECODE_STEP_MS = 10.0
# What reloading a prompt token from a worker's tier costs, as a fraction of computing it there, until
# the worker reports a measured reload speed for that tier (WorkerLoad.reload_tokens_per_s): cheaper than
# recomputing, not free. A tier not named here counts as "shared".
DEFAULT_RELOAD_COST = {"host": 0.05, "disk": 0.2, "shared": 0.3}
# The "tier" of a prompt block that a prefill in flight on the worker is computing: cached once that
# prefill is done, which the worker's queue already counts (so it costs nothing more here).
IN_FLIGHT = "in_flight"


class NoWorkerError(LookupError):
    """No live worker of the role; carries the role."""

    def __init__(self, role: str) -> None:
        super().__init__(f"no {role} worker is available")
        self.role = role


@dataclass(frozen=True)
class Choice:
    """A routing decision. reason (the label of k2serve_router_routing_decisions_total): prefix_hit
    (chosen for, or with, cached blocks of the prompt), load (by load or predicted TTFT, no cached
    block), cache_balance (a new conversation, where it evicts the coldest blocks), round_robin,
    only_worker (one candidate), session (the session's holder, kept), prefix_in_flight (chosen for
    a prefix a prefill in flight there is computing: the previous turn of a conversation, still
    running); decode workers by `kv`: tpot (least predicted TPOT, every candidate's free KV could hold the request),
    kv_pressure (least predicted TPOT among those that can, some could not), no_kv_fit (none could
    by its last report: the one with the most free blocks, whose reservation decides).
    cached_tokens: the prompt tokens the index predicts the worker's cache holds (with those prefills in
    flight there compute, when the policy counts them). candidates: what `KVAware` saw of each
    prefill candidate (for the router's --routing-log; empty for other policies and roles)."""

    worker: Worker
    reason: str
    cached_tokens: int = 0
    predicted_ttft_s: float | None = None
    predicted_tpot_ms: float | None = None
    candidates: tuple[Candidate, ...] = ()


@dataclass(frozen=True)
class Candidate:
    """One prefill worker as `KVAware` scored a prompt: its predicted TTFT, its queued prefill tokens (as
    counted; `reported_queue`: the worker's last heartbeat's, `router_queue`: the uncached tokens of the
    router's calls under way there), its prefill speed (tokens/s, as used), and the prompt's leading
    tokens cached there by where they are: its own tiers (`local`: device, host, disk), the shared store
    (`shared`), and computed by a prefill in flight there (`in_flight`: counted in `predicted_ttft_s`
    only by a policy that counts them)."""

    worker_id: str
    predicted_ttft_s: float
    queued_tokens: int
    local: int
    shared: int
    in_flight: int
    reported_queue: int = 0
    router_queue: int = 0
    tokens_per_s: float = 0.0


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
        max_tokens: int = 0,
    ) -> Choice:
        """max_tokens: the request's output budget (its decode worker must hold prompt + that)."""
        live = live_workers(workers, role, exclude)
        return Choice(self.pick(live, role), "only_worker" if len(live) == 1 else self.reason)

    def prefilled(self, worker: Worker, prompt: PromptBlocks) -> None:
        """`worker` (still registered) has just prefilled `prompt`: a policy may learn from it."""

    def dispatched(self, worker: Worker, prompt: PromptBlocks) -> None:
        """A prefill of `prompt` is sent to `worker`; `settled` follows once it is answered or failed."""

    def settled(self, worker: Worker, prompt: PromptBlocks) -> None:
        """The prefill `dispatched` announced is over (answered, failed or cancelled)."""


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
    """Seconds to reload the cached blocks in `tiers` (one tier name per block; "device" and IN_FLIGHT
    are free): a
    tier's measured reload speed (tokens/s, `measured`) where the worker reported one, else its `cost`
    (DEFAULT_RELOAD_COST: a fraction of recomputing at `prefill_tokens_per_s`)."""
    cost = DEFAULT_RELOAD_COST if cost is None else cost
    total = 0.0
    for tier in tiers:
        if tier in (DEVICE, IN_FLIGHT):  # in its pool, or will be once the queued prefill is done
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

    queued: `Worker.queued_prefill_tokens`: what the worker last reported less the prefills answered
    since that report, and at least the uncached tokens the router has sent it and not seen answered
    (fresher between heartbeats). speed: the worker's measured prefill tokens/s;
    before it has one, the mean of the candidates' measured speeds (DEFAULT_PREFILL_TOKENS_PER_S when
    none has). Cached tokens and their tiers come from `index` (only for workers that publish KV
    events); a tier's reload speed is the worker's measured one, else `reload_cost` (a fraction of
    recomputing, DEFAULT_RELOAD_COST). Blocks in the shared store a worker reaches (KVIndex: whoever
    put them) count as cached on every worker of that store, in tier "shared": fetched at the worker's
    measured store reload speed, else at reload_cost["shared"]. Ties go to more cached tokens, then
    `load_key`. Prefill without a prompt is least loaded.

    Cache balance (reason `cache_balance`): a prompt no worker holds more than one block more of than
    another in its own tiers (the shared store's blocks are every worker's alike), nor more than
    `balance_max_share` of the prompt more (a new conversation, or one only the store still holds;
    every prompt may share a system prompt's block: `_new_conversation`) goes, among the workers
    whose predicted TTFT is within `balance_slack` times its own uncached prefill time of the best, to
    the one whose prefix cache loses the least recently used blocks by taking it
    (`KVIndex.eviction_cost`), then the one holding fewest blocks, then as above. Measured on the
    Mooncake conversation trace (BENCHMARKS.md): by TTFT (least queued) alone new conversations pile onto
    a worker whose cache holds live conversations and evict their prefixes while another worker's cache
    holds cold blocks; that, not turns moved away from their holder, was most of the lost reuse.

    Prefills in flight (`count_in_flight`, reason `prefix_in_flight`): the blocks of a prompt whose
    prefill the router has sent to a worker and not seen answered count as cached there after the ones
    the index places (tier IN_FLIGHT, free: the worker's queue already holds that prefill, and the
    worker computes the next prompt after it, finding its blocks), and that worker's queue counts the
    in-flight prefill as progressing since it was sent: less min(its in-flight tokens of this prompt,
    seconds since it was sent x the worker's speed) (without that, waiting for a prefill of the same
    prefix would always predict slower than recomputing it on an idle worker: the queue would count the
    whole prefill as still to do). A conversation that resends its history while its previous turn is
    still being computed then goes to (waits behind) that turn's worker when that is still the least
    predicted TTFT, instead of recomputing its prefix elsewhere (or missing it in the shared store,
    where the previous turn's blocks are not yet put).

    Decode worker (with a prompt) = `choose_decode`: argmin of predicted TPOT over the workers whose
    free KV can hold the request's context (prompt + max_tokens)."""

    def __init__(
        self,
        index: KVIndex,
        reload_cost: dict[str, float] | None = None,
        balance_slack: float = 1.0,
        cache_balance: bool = True,
        balance_max_share: float = 0.1,
        count_in_flight: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = index
        self.reload_cost = DEFAULT_RELOAD_COST if reload_cost is None else reload_cost
        self.balance_slack = balance_slack
        self.balance_max_share = balance_max_share
        self.cache_balance = cache_balance
        self.count_in_flight = count_in_flight
        # worker id -> chain hash -> [how many prefills in flight there compute that block, when the
        # first of them was sent (`clock`)]
        self._in_flight: dict[str, dict[int, list[float]]] = {}
        self._clock = clock

    def choose(
        self,
        workers: Sequence[Worker],
        role: str,
        exclude: frozenset[str] = frozenset(),
        prompt: PromptBlocks | None = None,
        max_tokens: int = 0,
    ) -> Choice:
        if role == "decode" and prompt is not None:
            return choose_decode(live_workers(workers, role, exclude), prompt.num_tokens + max_tokens)
        if role != "prefill" or prompt is None:
            return super().choose(workers, role, exclude, prompt)
        live = live_workers(workers, role, exclude)
        tiers = self._cached_tiers(live, prompt)
        measured = [w.load.prefill_tokens_per_s for w in live if w.load.prefill_tokens_per_s > 0]
        fallback = sum(measured) / len(measured) if measured else DEFAULT_PREFILL_TOKENS_PER_S
        cached: dict[str, int] = {}
        local: dict[str, int] = {}  # of those, what the worker holds itself (not in the shared store)
        scored = []
        seen = []
        for w in live:
            queued = w.queued_prefill_tokens()
            speed = w.load.prefill_tokens_per_s if w.load.prefill_tokens_per_s > 0 else fallback
            held = tiers[w.worker_id]
            size = w.info.block_size
            counted = held if self.count_in_flight else [t for t in held if t != IN_FLIGHT]
            if len(counted) > len(held) - held.count(IN_FLIGHT):  # it waits for an in-flight prefill
                queued = max(0, queued - self._progress(w, prompt, held, speed))
            cached[w.worker_id] = len(counted) * size
            local[w.worker_id] = sum(t != SHARED for t in counted) * size
            reload_s = reload_seconds(
                counted, size, speed, dict(w.load.reload_tokens_per_s), self.reload_cost
            )
            ttft = predicted_ttft_s(queued, prompt.num_tokens, cached[w.worker_id], speed, reload_s)
            scored.append((ttft, -cached[w.worker_id], load_key(w), w))
            n_shared, n_flight = held.count(SHARED) * size, held.count(IN_FLIGHT) * size
            own = len(held) * size - n_shared - n_flight
            reported = w.load.queued_prefill_tokens
            seen.append(
                Candidate(
                    w.worker_id, ttft, queued, own, n_shared, n_flight, reported, w.prefill_tokens, speed
                )
            )
        candidates = tuple(seen)
        ttft, minus_cached, _, best = min(scored, key=lambda s: s[:3])
        if (
            self.cache_balance
            and len(live) > 1
            and self._new_conversation(local, prompt, max(w.info.block_size for w in live))
        ):
            # a new conversation: among the workers whose predicted TTFT is within the slack of the best, the one where it evicts least
            slack = (prompt.num_tokens + minus_cached) / fallback * self.balance_slack
            near = [s for s in scored if s[0] <= ttft + slack]
            ttft, minus_cached, _, best = min(
                near, key=lambda s: (self._eviction_cost(s[3], prompt, local[s[3].worker_id]), s[2])
            )
            return Choice(best, "cache_balance", -minus_cached, ttft, candidates=candidates)
        reason = "only_worker" if len(live) == 1 else "prefix_hit" if minus_cached < 0 else "load"
        if reason == "prefix_hit" and self.count_in_flight and IN_FLIGHT in tiers[best.worker_id]:
            reason = "prefix_in_flight"
        return Choice(best, reason, -minus_cached, ttft, candidates=candidates)

    def _new_conversation(self, cached: dict[str, int], prompt: PromptBlocks, block_size: int) -> bool:
        """Whether no worker holds more of `prompt` than another beyond one block (`block_size` tokens) and
        `balance_max_share` of the prompt: what one worker holds more of is then a prefix every prompt
        shares (a system prompt), worth less than where the conversation's own blocks will go. A short
        conversation's own first block stays a prefix hit (the share bound)."""
        spread = max(cached.values()) - min(cached.values())
        return spread <= block_size and spread <= self.balance_max_share * prompt.num_tokens

    def _eviction_cost(self, w: Worker, prompt: PromptBlocks, cached_tokens: int) -> tuple[int, int]:
        """What prefilling `prompt` on `w` costs other conversations: (`KVIndex.eviction_cost`, the
        blocks the index places there), both 0 for a worker without KV events or a reported pool."""
        size = w.info.block_size
        if not w.info.publishes_kv_events or size <= 0 or w.load.total_blocks == 0:
            return (0, 0)
        blocks = math.ceil(prompt.num_tokens / size) - cached_tokens // size
        cost = self.index.eviction_cost(w.worker_id, blocks, w.load.total_blocks)
        return (cost, self.index.blocks_of(w.worker_id))

    def prefilled(self, worker: Worker, prompt: PromptBlocks) -> None:
        """The worker's prefix cache now holds the prompt's blocks: place them in the index at once, not a
        heartbeat later, so the next turn of a fast agent loop finds them. Its KV events still follow
        (and remove what it evicts); a block evicted before this runs misleads at most one request,
        whose prefill computes and caches it again."""
        if _indexed(worker):
            hashes = prompt.hashes(worker.info.block_size)
            self.index.apply(worker.worker_id, hashes, [False] * len(hashes))

    def dispatched(self, worker: Worker, prompt: PromptBlocks) -> None:
        """Its prompt's blocks are being computed on `worker`: IN_FLIGHT there until `settled`."""
        if _indexed(worker):
            mine = self._in_flight.setdefault(worker.worker_id, {})
            now = self._clock()
            for h in prompt.hashes(worker.info.block_size):
                mine.setdefault(h, [0, now])[0] += 1

    def _progress(self, w: Worker, prompt: PromptBlocks, held: Sequence[str], speed: float) -> int:
        """Tokens of `w`'s queue done since the in-flight prefill computing the prompt's leading blocks
        (`held`: their tiers there, the last IN_FLIGHT) was sent: elapsed seconds x `speed`, at most the
        prompt's in-flight tokens there."""
        sent = self._in_flight[w.worker_id][prompt.hashes(w.info.block_size)[len(held) - 1]][1]
        flight = held.count(IN_FLIGHT) * w.info.block_size
        return min(flight, int((self._clock() - sent) * speed))

    def settled(self, worker: Worker, prompt: PromptBlocks) -> None:
        """The prefill is over: its blocks are no longer IN_FLIGHT (the index has them if it succeeded)."""
        mine = self._in_flight.get(worker.worker_id)
        if mine is None or not _indexed(worker):
            return
        for h in prompt.hashes(worker.info.block_size):
            entry = mine.get(h)
            if entry is not None:
                entry[0] -= 1
                if entry[0] <= 0:
                    del mine[h]
        if not mine:
            del self._in_flight[worker.worker_id]

    def _cached_tiers(self, workers: Sequence[Worker], prompt: PromptBlocks) -> dict[str, list[str]]:
        """worker id -> the tier of each leading prompt block the index places in its cache (none for
        workers without KV events), then IN_FLIGHT for each further one a prefill in flight there
        computes."""
        out: dict[str, list[str]] = {w.worker_id: [] for w in workers}
        by_size: dict[int, list[str]] = {}
        for w in workers:
            if _indexed(w):
                by_size.setdefault(w.info.block_size, []).append(w.worker_id)
        for size, ids in by_size.items():
            out |= self.index.cached_tiers(prompt.hashes(size), ids)
            for wid in ids:
                pending = self._in_flight.get(wid, {})
                held = out[wid]
                for h in prompt.hashes(size)[len(held) :]:
                    if h not in pending:
                        break
                    held.append(IN_FLIGHT)
        return out


def _indexed(w: Worker) -> bool:
    """Whether the KV index (and so KVAware) knows `w`'s cache: it publishes KV events and a block size."""
    return w.info.publishes_kv_events and w.info.block_size > 0


def kv_fits(w: Worker, tokens: int) -> bool:
    """Whether `w`'s KV pool, as it last reported, can hold a request of `tokens` tokens of context:
    its free blocks plus those session leases hold (a lease gives way to a request that needs its
    blocks) cover ceil(tokens / block size). A worker that reports no pool (static) fits."""
    if w.load.total_blocks == 0 or w.info.block_size <= 0:
        return True
    return w.load.free_blocks + w.load.leased_blocks >= math.ceil(tokens / w.info.block_size)


def predicted_tpot_ms(step_ms: float, step_batch: float, running: int) -> float:
    """ms per output token on a decode worker once one more sequence joins its `running` ones: the
    measured step time (`step_ms` at a batch of `step_batch` sequences), scaled in proportion to the
    batch when the new batch is larger than the measured one and never below the measured time (a
    decode step has a fixed part: fewer sequences do not make it proportionally faster)."""
    return step_ms * max(1.0, (running + 1) / max(step_batch, 1.0))


def choose_decode(live: Sequence[Worker], tokens: int) -> Choice:
    """The decode worker for a request of `tokens` tokens of context (prompt + max_tokens) among `live`:
    argmin of `predicted_tpot_ms` over those `kv_fits` admits (ties to `load_key`); when none fits, the
    one with the most free (and leased) blocks. The batch a request joins is the larger of the worker's
    reported running sequences and the router's in-flight requests to it (fresher between heartbeats);
    a worker without a measured step gets the candidates' mean (DEFAULT_DECODE_STEP_MS when none has one)."""
    if len(live) == 1:
        return Choice(live[0], "only_worker")
    fit = [w for w in live if kv_fits(w, tokens)]
    if not fit:
        best = min(live, key=lambda w: (-w.load.free_blocks - w.load.leased_blocks, load_key(w)))
        return Choice(best, "no_kv_fit")
    measured = [w for w in fit if w.load.decode_step_ms > 0]
    fallback_ms = (
        sum(w.load.decode_step_ms for w in measured) / len(measured) if measured else DEFAULT_DECODE_STEP_MS
    )
    fallback_batch = sum(w.load.decode_step_batch for w in measured) / len(measured) if measured else 1.0
    scored = []
    for w in fit:
        step_ms, batch = (
            (w.load.decode_step_ms, w.load.decode_step_batch)
            if w.load.decode_step_ms > 0
            else (fallback_ms, fallback_batch)
        )
        tpot = predicted_tpot_ms(step_ms, batch, max(w.load.running, w.in_flight))
        scored.append((tpot, load_key(w), w))
    tpot, _, best = min(scored, key=lambda s: s[:2])
    return Choice(best, "tpot" if len(fit) == len(live) else "kv_pressure", predicted_tpot_ms=tpot)


def make_policy(name: str, index: KVIndex, clock: Callable[[], float] = time.monotonic) -> RoutingPolicy:
    """The policy `--routing-policy name` selects (POLICIES); `clock`: KVAware's (a simulation's time)."""
    if name == "kv":
        return KVAware(index, clock=clock)
    if name == "kv-ttft":
        return KVAware(index, cache_balance=False, clock=clock)
    if name == "kv-settled":
        return KVAware(index, count_in_flight=False, clock=clock)
    if name == "least-loaded":
        return LeastLoaded()
    if name == "round-robin":
        return RoundRobin()
    raise ValueError(f"--routing-policy must be one of {', '.join(POLICIES)}, got {name!r}")
