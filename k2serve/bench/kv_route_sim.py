"""`python -m k2serve.bench.kv_route_sim`: replay a Mooncake trace sample through a routing policy
(the router's own `KVAware` / `LeastLoaded` / `RoundRobin` objects) on simulated prefill workers, to
see per request where prefix hits are lost. Seconds, not a cluster's minutes; a diagnosis aid, not a
measurement (`k2serve bench kv-trace` measures the real servers).

Model: each worker is a FIFO prefill queue at a fixed speed (`--prefill-tokens-per-s`) with a prefix
cache of `--capacity-blocks` blocks, LRU, a request's blocks inserted tail first when its prefill
starts (as `ideal_cache_hits`, per worker). The router sees the exact cache (a perfectly fresh index)
and its own queued uncached tokens per worker (Worker.prefill_tokens), as between heartbeats, and the
prefills it has sent and not seen end (KVAware.dispatched / settled, on the simulation's clock). Not
modelled: session leases, blocks pinned by running requests, heartbeat staleness, decode.

`--store-blocks N` adds a shared store every worker reaches (the Mooncake Store tier): one LRU of N
blocks; a prefill puts all its blocks when it starts (put on compute) and, after its device prefix,
fetches the following blocks the store holds (each costs `--store-reload-cost` of computing it, as
DEFAULT_RELOAD_COST["shared"] predicts); the index learns the puts and fetches at once (an exact index of
the store). The best is then one LRU of the pools' and the store's blocks together (as `bench kv-trace
--kv-store mooncake` counts it).

Each lost hit (against the best LRU of all workers' blocks together) is put down to one cause:
  moved     the request went to another worker than the one the index said held the longest prefix
            (predicted TTFT: its queue outweighed the cached prefix), losing the difference;
  raced     chosen for a prefix the worker then evicted before the prefill started (queued requests
            of others evicted it);
  evicted   the best chosen worker held less than the shared LRU would have (the conversation's
            blocks were evicted by others on its worker while another worker's cache had room or
            colder blocks: split caches / placement).
(with a store, "held" is a worker's device prefix and what the store holds after it)
"""

from __future__ import annotations

import argparse
import heapq
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from k2serve.loadgen.trace import (
    TraceEntry,
    TraceScaling,
    ideal_cache_hits,
    read_trace,
    sample_conversations,
    trace_requests,
)
from k2serve.proto import registry_pb2
from k2serve.router.kv_index import KVIndex
from k2serve.router.policy import DEFAULT_RELOAD_COST, POLICIES, PromptBlocks, make_policy
from k2serve.router.registry import Worker


@dataclass
class SimWorker:
    """A simulated prefill worker: its router-side `Worker`, LRU prefix cache and FIFO queue."""

    worker: Worker
    capacity: int
    cache: OrderedDict[int, None] = field(default_factory=OrderedDict)  # least recently used first
    free_at: float = 0.0

    def hit_blocks(self, hashes: Sequence[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.cache:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int], index: KVIndex) -> None:
        """The prompt's blocks most recently used (first block most recent); evicted ones leave `index`."""
        wid = self.worker.worker_id
        for h in reversed(hashes):
            self.cache[h] = None
            self.cache.move_to_end(h)
        index.apply(wid, list(hashes), [False] * len(hashes))
        gone = []
        while len(self.cache) > self.capacity:
            gone.append(self.cache.popitem(last=False)[0])
        if gone:
            index.apply(wid, gone, [True] * len(gone))


@dataclass(frozen=True)
class SimRecord:
    """One request's fate: chosen worker, predicted / actual hit tokens, the holder's, the ideal's."""

    index: int
    worker: str
    predicted: int
    actual: int
    holder_tokens: int  # the most any worker's cache held at decision time
    ideal: int  # the shared LRU of all workers' blocks
    ttft_s: float
    reason: str = ""  # the policy's Choice.reason


def sim_workers(n: int, capacity: int, block_size: int, tokens_per_s: float) -> list[SimWorker]:
    out = []
    for i in range(n):
        info = registry_pb2.WorkerInfo(
            worker_id=f"prefill-{i}",
            role=registry_pb2.WORKER_ROLE_PREFILL,
            block_size=block_size,
            publishes_kv_events=True,
        )
        load = registry_pb2.WorkerLoad(
            total_blocks=capacity, free_blocks=capacity, prefill_tokens_per_s=tokens_per_s
        )
        w = Worker(info.worker_id, "prefill", f"sim:{i}", info, None, load=load, ready=True)  # type: ignore[arg-type]
        out.append(SimWorker(w, capacity))
    return out


STORE = "sim-store"  # the simulated shared store's id in the index


@dataclass
class SimStore:
    """The simulated shared store: one LRU of `capacity` blocks, mirrored in the router's index."""

    capacity: int
    index: KVIndex
    blocks: OrderedDict[int, None] = field(default_factory=OrderedDict)  # least recently used first

    def after(self, hashes: Sequence[int], start: int) -> int:
        """How many of `hashes` from `start` on the store holds in a row."""
        n = 0
        for h in hashes[start:]:
            if h not in self.blocks:
                break
            n += 1
        return n

    def put(self, hashes: Sequence[int]) -> None:
        """`hashes` put (or fetched: used) now, in order; the least recently used beyond capacity go."""
        for h in hashes:
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
        self.index.store_put(STORE, hashes)


def simulate(
    policy_name: str,
    prompts: Sequence[tuple[float, Sequence[int]]],
    workers: int,
    capacity: int,
    block_size: int,
    tokens_per_s: float,
    store_blocks: int = 0,
    store_reload_cost: float = DEFAULT_RELOAD_COST["shared"],
) -> list[SimRecord]:
    """Route `prompts` ((arrival s, token ids), in arrival order) with `policy_name` on simulated workers
    (with a shared store of `store_blocks` blocks when > 0)."""
    index = KVIndex()
    now = [0.0]  # the simulation's clock (the latest arrival routed)
    policy = make_policy(policy_name, index, clock=lambda: now[0])
    sims = sim_workers(workers, capacity, block_size, tokens_per_s)
    by_id = {s.worker.worker_id: s for s in sims}
    store = SimStore(store_blocks, index) if store_blocks > 0 else None
    for k, s in enumerate(sims) if store is not None else ():
        s.worker.info.kv_store = STORE
        share = store_blocks // workers + (k < store_blocks % workers)
        index.join_store(s.worker.worker_id, STORE, share)  # their shares add up to the store's size
    hashes_of = [PromptBlocks(p).hashes(block_size) for _, p in prompts]
    ideal = ideal_cache_hits(
        [[(h, block_size) for h in hs] + [(0, 1)] for hs in hashes_of],
        block_size,
        capacity * workers + store_blocks,
    )
    queues: dict[str, deque[tuple[int, int, int, str]]] = {s.worker.worker_id: deque() for s in sims}
    ends: list[tuple[float, str, int, int]] = []  # (prefill end, worker, uncached predicted, request)
    records: dict[int, SimRecord] = {}

    def held(s: SimWorker, hashes: Sequence[int]) -> int:
        """Blocks of a prompt `s` can reuse: its device prefix, then what the store holds after it."""
        device = s.hit_blocks(hashes)
        return device + (store.after(hashes, device) if store is not None else 0)

    def advance(t: float) -> None:
        """Run the workers' queues (prefill starts and ends in time order) up to `t`."""
        while True:
            nxt = min(
                (
                    (max(s.free_at, prompts[queues[wid][0][0]][0]), wid)
                    for wid, s in by_id.items()
                    if queues[wid]
                ),
                default=(math.inf, ""),
            )
            if ends and ends[0][0] <= nxt[0] and ends[0][0] <= t:
                _, wid, queued, done = heapq.heappop(ends)
                by_id[wid].worker.prefill_tokens -= queued
                by_id[wid].worker.in_flight -= 1
                policy.settled(by_id[wid].worker, PromptBlocks(prompts[done][1]))
                continue
            if nxt[0] > t or not nxt[1]:
                return
            st, wid = nxt
            s = by_id[wid]
            i, predicted, holder, reason = queues[wid].popleft()
            device = s.hit_blocks(hashes_of[i])
            fetched = held(s, hashes_of[i]) - device
            actual = (device + fetched) * block_size
            s.insert(hashes_of[i], index)
            if store is not None:  # the fetched blocks are used, all of them put (put on compute)
                store.put(hashes_of[i])
            fetch_s = fetched * block_size * store_reload_cost / tokens_per_s
            s.free_at = st + (len(prompts[i][1]) - actual) / tokens_per_s + fetch_s
            heapq.heappush(ends, (s.free_at, wid, len(prompts[i][1]) - predicted, i))
            records[i] = SimRecord(
                i, wid, predicted, actual, holder, ideal[i], s.free_at - prompts[i][0], reason
            )

    for i, (arrival, tokens) in enumerate(prompts):
        advance(arrival)
        now[0] = arrival
        blocks = PromptBlocks(tokens)
        holder = max(held(s, hashes_of[i]) for s in sims) * block_size
        choice = policy.choose([s.worker for s in sims], "prefill", frozenset(), blocks)
        w = choice.worker
        policy.dispatched(w, blocks)
        w.routed += 1
        w.in_flight += 1
        w.prefill_tokens += len(tokens) - choice.cached_tokens
        queues[w.worker_id].append((i, choice.cached_tokens, holder, choice.reason))
    advance(math.inf)
    return [records[i] for i in range(len(prompts))]


def losses(records: Sequence[SimRecord]) -> dict[str, int]:
    """Hit tokens lost against the shared LRU, by cause (see the module doc)."""
    out = {"moved": 0, "raced": 0, "evicted": 0, "gained": 0}
    for r in records:
        out["moved"] += max(0, r.holder_tokens - r.predicted)
        out["raced"] += max(0, r.predicted - r.actual)
        out["evicted"] += max(0, r.ideal - r.holder_tokens)
        out["gained"] += max(0, r.actual - r.ideal)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m k2serve.bench.kv_route_sim", description=__doc__)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--conversations", type=int, default=24)
    ap.add_argument("--max-context", type=int, default=1000)
    ap.add_argument("--trace-scale", type=float, default=1 / 32)
    ap.add_argument("--time-scale", type=float, default=0.02)
    ap.add_argument("--prefill", default="2,4")
    ap.add_argument("--capacity-blocks", type=int, default=67)
    ap.add_argument("--prefill-tokens-per-s", default="2000")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument(
        "--store-blocks",
        default="0",
        help="shared store sizes to replay, in blocks, comma-separated (0: none; see the module doc)",
    )
    ap.add_argument("--store-reload-cost", type=float, default=DEFAULT_RELOAD_COST["shared"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    scaling = TraceScaling(args.time_scale, args.trace_scale, vocab_size=1000)
    bs = scaling.scaled_block_size

    def fits(e: TraceEntry) -> bool:
        return sum(n for _, n in scaling.scaled_blocks(e)) + scaling.output_len(e) <= args.max_context

    entries = sample_conversations(read_trace(args.trace), args.conversations, args.seed, fits=fits)
    prompts = [(r.arrival_s or 0.0, r.prompt) for r in trace_requests(entries, scaling, args.seed)]
    for speed in (float(x) for x in args.prefill_tokens_per_s.split(",")):
        for store in (int(x) for x in args.store_blocks.split(",")):
            for n in (int(x) for x in args.prefill.split(",")):
                for p in args.policies.split(","):
                    recs = simulate(
                        p, prompts, n, args.capacity_blocks, bs, speed, store, args.store_reload_cost
                    )
                    actual = sum(r.actual for r in recs)
                    best = sum(r.ideal for r in recs)
                    reasons = Counter(r.reason for r in recs)
                    print(
                        f"{speed:7.0f} tok/s store {store:5d} {n} {p:13s} {actual:6d} of {best:6d} = "
                        f"{actual / best:6.1%}  lost {losses(recs)}  decisions {dict(reasons)}"
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
