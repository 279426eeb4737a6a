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
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence

DEFAULT_MAX_BLOCKS = 1 << 19
DEVICE = "device"


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
        """Forget every block of `worker_id` (it left, died, or sends a new snapshot)."""
        self._on_device.pop(worker_id, None)
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
        it holds, in order (as `cached_blocks`: up to the first block it does not hold)."""
        matched: dict[str, list[str]] = {w: [] for w in workers}
        live = set(matched)
        for h in hashes:
            holders = self._where.get(h, {})
            live = {w for w in live if w in holders}
            if not live:
                break
            for w in live:
                matched[w].append(holders[w])
        return matched

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
