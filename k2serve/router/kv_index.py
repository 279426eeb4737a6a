"""The router's global KV index: which prefill worker's prefix cache holds which block, by chain hash.

Workers publish their block manager's stored / removed events (k2serve.kvcache.block_manager.KVEventLog)
on the heartbeat, after a full snapshot of their stored hashes on every (re)registration; the router
applies them here in order. A worker's entries go when it leaves or dies (`drop`), and a restarted
router rebuilds the index from the snapshots of the workers re-registering with it.

Memory is bounded: at most `max_blocks` distinct hashes are kept; when a new hash would exceed that,
the least recently stored hash is forgotten (for every worker holding it). Forgetting loses only a
prediction (a request may miss a cache it could have hit), never correctness: the worker's own prefix
cache decides what is reused. A hash costs about 460 bytes with one holder and 140 more per further
holder (measured with tracemalloc, CPython 3.11: each worker's hashes are kept in recency order with a
store sequence number, for `eviction_cost`), so the default 2^19 hashes bound the index near 240 MiB
(with one holder each).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence

DEFAULT_MAX_BLOCKS = 1 << 19


class KVIndex:
    """hash -> the workers whose prefix cache holds that block. Touched only from the router's event loop."""

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        if max_blocks < 1:
            raise ValueError(f"--kv-index-max-blocks must be >= 1, got {max_blocks}")
        self.max_blocks = max_blocks
        self._where: OrderedDict[int, set[str]] = OrderedDict()  # least recently stored first
        # worker -> its hashes, least recently stored (or prefilled) by it first, with the index's store
        # sequence number then: which of its blocks its LRU evicts next, and how recently they were used
        self._of: dict[str, OrderedDict[int, int]] = {}
        self._seq = 0  # stores so far (a clock comparable across workers)
        self.forgotten = 0  # hashes dropped to stay within max_blocks

    def __len__(self) -> int:
        return len(self._where)

    def blocks_of(self, worker_id: str) -> int:
        """How many blocks the index places on `worker_id`."""
        return len(self._of.get(worker_id, ()))

    def workers(self) -> list[str]:
        """Workers with an entry (a snapshot, possibly empty, or events)."""
        return list(self._of)

    def holds(self, worker_id: str, block_hash: int) -> bool:
        return worker_id in self._where.get(block_hash, ())

    def replace(self, worker_id: str, hashes: Iterable[int]) -> None:
        """A worker's full snapshot (on registration): exactly `hashes`, whatever it had before."""
        self.drop(worker_id)
        self._of[worker_id] = OrderedDict()
        for h in hashes:
            self._store(worker_id, h)

    def apply(self, worker_id: str, hashes: Sequence[int], removed: Sequence[bool]) -> None:
        """A worker's events in order: hashes[i] was removed when removed[i], else stored."""
        if len(hashes) != len(removed):
            raise ValueError(f"KV events: {len(hashes)} hashes but {len(removed)} removed flags")
        self._of.setdefault(worker_id, OrderedDict())
        for h, gone in zip(hashes, removed, strict=True):
            if gone:
                self._remove(worker_id, h)
            else:
                self._store(worker_id, h)

    def drop(self, worker_id: str) -> None:
        """Forget every block of `worker_id` (it left, died, or sends a new snapshot)."""
        for h in self._of.pop(worker_id, {}):
            holders = self._where.get(h)
            if holders is not None:
                holders.discard(worker_id)
                if not holders:
                    del self._where[h]

    def cached_blocks(self, hashes: Sequence[int], workers: Iterable[str]) -> dict[str, int]:
        """For each of `workers`, how many leading blocks of a prompt (its chain `hashes`) it holds:
        block k counts only when blocks 0..k all do (a prefix cache serves a prefix, nothing after a gap)."""
        matched = dict.fromkeys(workers, 0)
        live = set(matched)
        for k, h in enumerate(hashes):
            live &= self._where.get(h, set())
            if not live:
                break
            for w in live:
                matched[w] = k + 1
        return matched

    @property
    def clock(self) -> int:
        """The store sequence number of the latest store (0 before any)."""
        return self._seq

    def eviction_cost(self, worker_id: str, blocks: int, capacity: int) -> int:
        """How recently used the blocks are that `worker_id` would evict to store `blocks` new ones in a
        prefix cache of `capacity` blocks: the store sequence number (`clock` then) of the newest of its
        `blocks - free` least recently stored blocks, 0 when it has room (free = capacity - blocks the
        index places there). A worker whose LRU blocks are old (low number) loses little by taking a new
        conversation; one whose whole cache was used a moment ago loses a live conversation's prefix."""
        mine = self._of.get(worker_id)
        if mine is None:
            return 0
        evict = min(blocks - max(0, capacity - len(mine)), len(mine))
        if evict <= 0:
            return 0
        return next(itertools.islice(mine.values(), evict - 1, None))

    def _store(self, worker_id: str, h: int) -> None:
        holders = self._where.get(h)
        if holders is None:
            holders = self._where[h] = set()
            while len(self._where) > self.max_blocks:
                old, olds = self._where.popitem(last=False)
                for w in olds:
                    self._of[w].pop(old, None)
                self.forgotten += 1
        else:
            self._where.move_to_end(h)
        holders.add(worker_id)
        self._seq += 1
        mine = self._of[worker_id]
        mine[h] = self._seq
        mine.move_to_end(h)

    def _remove(self, worker_id: str, h: int) -> None:
        holders = self._where.get(h)
        if holders is None:
            return
        holders.discard(worker_id)
        self._of[worker_id].pop(h, None)
        if not holders:
            del self._where[h]
