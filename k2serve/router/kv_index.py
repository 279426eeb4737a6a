"""The router's global KV index: which prefill worker's prefix cache holds which block, by chain hash,
and in which of its tiers ("device": its pool; "host" / "disk" / "shared": offloaded below it).

Workers publish their block manager's stored / removed events (k2serve.kvcache.block_manager.KVEventLog)
on the heartbeat, after a full snapshot of their stored hashes on every (re)registration; the router
applies them here in order. A worker's entries go when it leaves or dies (`drop`), and a restarted
router rebuilds the index from the snapshots of the workers re-registering with it.

Memory is bounded: at most `max_blocks` distinct hashes are kept; when a new hash would exceed that,
the least recently stored hash is forgotten (for every worker holding it). A stored event for a held
block only updates its tier (an offload, or a reload back to the device). Forgetting loses only a
prediction (a request may miss a cache it could have hit), never correctness: the worker's own prefix
cache decides what is reused. A hash costs about 430 bytes with one holder (395 when it is held only in
a tier) and 140 more per further holder (tracemalloc, CPython 3.11, benchmarks/kv_index_memory.py: each
worker's hashes are kept in recency order with a store sequence number, for `eviction_cost`, and each
hash maps to {worker: tier}), so the default 2^19 hashes bound the index near 215 MiB (with one holder
each).

The shared store (a Mooncake Store every worker of it reaches, kvcache/shared_tier.py) is indexed apart
from the workers: a block in it is fetchable by every worker of that store (WorkerInfo.kv_store: the
store's address and the model namespace), whichever worker put it, so `cached_tiers` places it, as tier
"shared", for each of them (after the tiers a worker holds it in itself, which it reads first). Workers
publish their successful puts (KVEvents.store_puts; a registration's snapshot repeats the puts it
remembers, so a restarted router relearns the store) and the blocks a lookup of theirs found missing or
bad in the store (store_misses). The store evicts without telling anyone, so the index of a store is
approximate and says so: it is an LRU of puts bounded by the store's capacity (the sum of its
registered workers' kv_store_capacity_blocks; `max_blocks` when none says), a miss removes the entry at
once, and the entries go when the last worker of the store leaves. A stale entry costs one prediction:
the worker's own lookup misses, it recomputes from that block on (never wrong tokens) and publishes
the miss.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence

DEFAULT_MAX_BLOCKS = 1 << 19
DEVICE = "device"
SHARED = "shared"  # the tier of a block fetched from the shared store (KVTier KV_TIER_SHARED)


class KVIndex:
    """hash -> {worker: tier} of the workers whose prefix cache holds that block. Touched only from the
    router's event loop."""

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        if max_blocks < 1:
            raise ValueError(f"--kv-index-max-blocks must be >= 1, got {max_blocks}")
        self.max_blocks = max_blocks
        self._where: OrderedDict[int, dict[str, str]] = OrderedDict()  # least recently stored first
        # worker -> every hash it holds: the ones in its device pool last, least recently stored (or
        # prefilled) first, with the index's store sequence number then (which of its device blocks its
        # LRU evicts next, and how recently they were used); offloaded ones first, with 0
        self._of: dict[str, OrderedDict[int, int]] = {}
        self._on_device: dict[str, int] = {}  # worker -> how many of its hashes are in its device pool
        self._seq = 0  # device stores so far (a clock comparable across workers)
        self.forgotten = 0  # hashes dropped to stay within max_blocks
        # the shared stores: store id -> the hashes put there, least recently put first; and worker ->
        # (the store it reaches, the blocks its contribution holds)
        self._stores: dict[str, OrderedDict[int, None]] = {}
        self._store_of: dict[str, tuple[str, int]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def blocks_of(self, worker_id: str) -> int:
        """How many blocks the index places on `worker_id`."""
        return len(self._of.get(worker_id, ()))

    def tier_counts(self, worker_id: str) -> dict[str, int]:
        """How many blocks the index places in each tier of `worker_id` (only tiers with any)."""
        out: dict[str, int] = {}
        for h in self._of.get(worker_id, ()):
            tier = self._where[h][worker_id]
            out[tier] = out.get(tier, 0) + 1
        return out

    def workers(self) -> list[str]:
        """Workers with an entry (a snapshot, possibly empty, or events)."""
        return list(self._of)

    def holds(self, worker_id: str, block_hash: int) -> bool:
        return worker_id in self._where.get(block_hash, ())

    def tier_of(self, worker_id: str, block_hash: int) -> str | None:
        """Where `worker_id` holds the block ("device", "host", ...), or None."""
        return self._where.get(block_hash, {}).get(worker_id)

    def replace(self, worker_id: str, hashes: Iterable[int], tiers: Sequence[str] = ()) -> None:
        """A worker's full snapshot (on registration): exactly `hashes` (in `tiers`, the same length;
        empty: all on the device), whatever it had before."""
        hashes = list(hashes)
        if tiers and len(tiers) != len(hashes):
            raise ValueError(f"KV snapshot: {len(hashes)} hashes but {len(tiers)} tiers")
        self.drop(worker_id)
        self._of[worker_id] = OrderedDict()
        self._on_device[worker_id] = 0
        for i, h in enumerate(hashes):
            self._store(worker_id, h, tiers[i] if tiers else DEVICE)

    def apply(
        self, worker_id: str, hashes: Sequence[int], removed: Sequence[bool], tiers: Sequence[str] = ()
    ) -> None:
        """A worker's events in order: hashes[i] was removed when removed[i], else stored in tiers[i]
        (`tiers` empty: all on the device)."""
        if len(hashes) != len(removed):
            raise ValueError(f"KV events: {len(hashes)} hashes but {len(removed)} removed flags")
        if tiers and len(tiers) != len(hashes):
            raise ValueError(f"KV events: {len(hashes)} hashes but {len(tiers)} tiers")
        self._of.setdefault(worker_id, OrderedDict())
        self._on_device.setdefault(worker_id, 0)
        for i, (h, gone) in enumerate(zip(hashes, removed, strict=True)):
            if gone:
                self._remove(worker_id, h)
            else:
                self._store(worker_id, h, tiers[i] if tiers else DEVICE)

    def drop(self, worker_id: str) -> None:
        """Forget every block of `worker_id` (it left, died, or sends a new snapshot) and its place in a
        shared store (the store's entries go with its last worker)."""
        self._on_device.pop(worker_id, None)
        store, _ = self._store_of.pop(worker_id, ("", 0))
        if store and not any(s == store for s, _ in self._store_of.values()):
            self._stores.pop(store, None)
        elif store:
            self._trim_store(store)
        for h in self._of.pop(worker_id, {}):
            holders = self._where.get(h)
            if holders is not None:
                holders.pop(worker_id, None)
                if not holders:
                    del self._where[h]

    def cached_blocks(self, hashes: Sequence[int], workers: Iterable[str]) -> dict[str, int]:
        """For each of `workers`, how many leading blocks of a prompt (its chain `hashes`) it holds:
        block k counts only when blocks 0..k all do (a prefix cache serves a prefix, nothing after a gap)."""
        return {w: len(tiers) for w, tiers in self.cached_tiers(hashes, workers).items()}

    def cached_tiers(self, hashes: Sequence[int], workers: Iterable[str]) -> dict[str, list[str]]:
        """For each of `workers`, the tier of each leading block of a prompt (its chain `hashes`) that
        it holds, in order (as `cached_blocks`: up to the first block it does not hold); a block it does
        not hold itself but its shared store does counts, as tier "shared"."""
        matched: dict[str, list[str]] = {w: [] for w in workers}
        stored = {w: self._stores.get(self._store_of[w][0]) for w in matched if w in self._store_of}
        live = set(matched)
        for h in hashes:
            holders = self._where.get(h, {})
            for w in list(live):
                tier = holders.get(w)
                if tier is None and h in (stored.get(w) or ()):
                    tier = SHARED
                if tier is None:
                    live.discard(w)
                else:
                    matched[w].append(tier)
            if not live:
                break
        return matched

    # ---- the shared store ------------------------------------------------------------------------
    def join_store(
        self, worker_id: str, store: str, capacity_blocks: int, hashes: Iterable[int] = ()
    ) -> None:
        """`worker_id` fetches from and puts to the shared store `store` (its id; "" none), giving it
        `capacity_blocks` blocks; `hashes`: the blocks it says it put there (its snapshot)."""
        if not store:
            return
        self._store_of[worker_id] = (store, max(0, capacity_blocks))
        self._stores.setdefault(store, OrderedDict())
        self.store_put(store, hashes)

    def store_of(self, worker_id: str) -> str | None:
        """The shared store `worker_id` reaches, or None."""
        return self._store_of.get(worker_id, ("", 0))[0] or None

    def store_capacity(self, store: str) -> int:
        """The blocks the index keeps for `store`: its workers' capacities together, capped by (and
        `max_blocks` when none gave one)."""
        total = sum(c for s, c in self._store_of.values() if s == store)
        return min(total, self.max_blocks) if total else self.max_blocks

    def store_blocks(self, store: str) -> int:
        """How many blocks the index places in `store`."""
        return len(self._stores.get(store, ()))

    def in_store(self, store: str, block_hash: int) -> bool:
        return block_hash in self._stores.get(store, ())

    def store_put(self, store: str, hashes: Iterable[int]) -> None:
        """Blocks put into `store` (by any of its workers), in order: each the most recently put; the
        least recently put beyond `store_capacity` are forgotten. Ignored for a store no registered
        worker reaches."""
        entries = self._stores.get(store)
        if entries is None:
            return
        for h in hashes:
            entries[h] = None
            entries.move_to_end(h)
        self._trim_store(store)

    def store_missing(self, store: str, hashes: Iterable[int]) -> None:
        """Blocks a lookup found missing or bad in `store` (evicted there): forgotten."""
        entries = self._stores.get(store)
        if entries is None:
            return
        for h in hashes:
            entries.pop(h, None)

    def _trim_store(self, store: str) -> None:
        entries = self._stores.get(store)
        if entries is not None:
            for _ in range(len(entries) - self.store_capacity(store)):
                entries.popitem(last=False)

    @property
    def clock(self) -> int:
        """The store sequence number of the latest device store (0 before any)."""
        return self._seq

    def eviction_cost(self, worker_id: str, blocks: int, capacity: int) -> int:
        """How recently used the blocks are that `worker_id` would evict to store `blocks` new ones in a
        device prefix cache of `capacity` blocks: the store sequence number (`clock` then) of the newest
        of its `blocks - free` least recently stored device blocks, 0 when it has room (free = capacity -
        the blocks the index places in its device pool). A worker whose LRU blocks are old (low number)
        loses little by taking a new conversation; one whose whole cache was used a moment ago loses a
        live conversation's prefix. Offloaded blocks take no device room."""
        mine = self._of.get(worker_id)
        if mine is None:
            return 0
        on_device = self._on_device[worker_id]
        evict = min(blocks - max(0, capacity - on_device), on_device)
        if evict <= 0:
            return 0
        return next(itertools.islice(mine.values(), len(mine) - on_device + evict - 1, None))

    def _store(self, worker_id: str, h: int, tier: str = DEVICE) -> None:
        holders = self._where.get(h)
        if holders is None:
            holders = self._where[h] = {}
            while len(self._where) > self.max_blocks:
                old, olds = self._where.popitem(last=False)
                for w, old_tier in olds.items():
                    self._forget(w, old, old_tier)
                self.forgotten += 1
        else:
            self._where.move_to_end(h)
        was = holders.get(worker_id)
        holders[worker_id] = tier
        mine = self._of[worker_id]
        if tier == DEVICE:
            self._seq += 1
            mine[h] = self._seq
            mine.move_to_end(h)
            self._on_device[worker_id] += was != DEVICE
        else:  # offloaded: out of the device LRU order, in front of it
            mine[h] = 0
            mine.move_to_end(h, last=False)
            self._on_device[worker_id] -= was == DEVICE

    def _forget(self, worker_id: str, h: int, tier: str | None) -> None:
        self._of[worker_id].pop(h, None)
        self._on_device[worker_id] -= tier == DEVICE

    def _remove(self, worker_id: str, h: int) -> None:
        holders = self._where.get(h)
        if holders is None:
            return
        self._forget(worker_id, h, holders.pop(worker_id, None))
        if not holders:
            del self._where[h]
