"""Which cache block belongs to which sequence: ref-counted blocks with hash-chained prefix caching.

Every block is in exactly one of three states:

- referenced: ref count >= 1, listed in the block tables of that many sequences;
- evictable: ref count 0 but registered under its chained hash, so a later request with the same
  prefix can take it back without recomputing; evicted least-recently-freed first;
- free: ref count 0 and no hash.

Only full blocks whose tokens have all been computed are registered (`mark_computed`), so a partial
block is never shared and a shared block is never written again. The manager keeps no per-sequence
state: callers own their block tables and pass them back. No CUDA, no tensors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from k2serve.kvcache.hashing import block_hash

__all__ = [
    "Allocation",
    "BlockManager",
    "BlockTiers",
    "BlockManagerError",
    "InvariantViolation",
    "KVEventLog",
    "NoFreeBlocksError",
]


class BlockManagerError(RuntimeError):
    """Misuse of the block manager (bad block id, double free, empty prompt, ...)."""


class NoFreeBlocksError(BlockManagerError):
    """Not enough free or evictable blocks; nothing was allocated."""

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(f"need {needed} new KV-cache blocks, only {available} free or evictable")
        self.needed = needed
        self.available = available


class BlockTiers(Protocol):
    """Where evicted blocks go and come back from (k2serve.kvcache.tiers.KVTiers; a protocol so that the
    manager stays free of tensors)."""

    def contains(self, h: int) -> bool: ...

    def hashes(self) -> list[int]: ...

    def offload(self, h: int, block: int) -> bool: ...

    def load(self, h: int) -> tuple[Any, str] | None: ...

    def write(self, block: int, payload: Any, tier: str) -> None: ...


class InvariantViolation(AssertionError):
    """`check_invariants` found the manager's state inconsistent (a bug, never a user error)."""


class KVEventLog:
    """Block stored / removed events of one BlockManager, in the order they happened, for a reader on
    another thread (the worker's heartbeat, which ships them to the router's KV index).

    An event is (chain hash, removed): stored when a computed full block is registered under its hash
    (only the block the hash map points at: a duplicate computed at the same time is private and never
    reported), removed when that block is evicted and its hash forgotten (with tiers attached: when it
    leaves the last tier; a block offloaded to a tier stays "stored", the worker still has it, and its
    reload publishes stored again, which the index takes as a no-op). These are the hashes vLLM's
    and Dynamo's KV events carry. The log holds at most `max_events`; past that it forgets them all and
    says so (`drain` returns overflowed=True): the reader must then resynchronise from a full snapshot
    (`BlockManager.stored_hashes`), so a reader that stops reading never costs more than the bound."""

    def __init__(self, max_events: int = 1 << 18) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.max_events = max_events
        self._lock = threading.Lock()
        self._events: list[tuple[int, bool]] = []
        self._overflowed = False

    def record(self, block_hash: int, removed: bool) -> None:
        with self._lock:
            if self._overflowed:
                return
            if len(self._events) >= self.max_events:
                self._events = []
                self._overflowed = True
                return
            self._events.append((block_hash, removed))

    def drain(self) -> tuple[list[tuple[int, bool]], bool]:
        """(the events since the last drain or reset, oldest first; whether some were lost: resync)."""
        with self._lock:
            events, overflowed = self._events, self._overflowed
            self._events, self._overflowed = [], False
        return events, overflowed

    def reset(self) -> None:
        """Forget every event (a snapshot was taken: what came before is in it)."""
        self.drain()


@dataclass(frozen=True)
class Allocation:
    """The blocks given to a new sequence.

    block_table: block ids covering positions [0, len(token_ids)); the caller owns the list and
        passes it to `append_slot`, `mark_computed` and `free`.
    num_cached_tokens: leading positions already in the cache (a multiple of block_size, at most
        len(token_ids) - 1); the caller computes positions from here on.
    """

    block_table: list[int]
    num_cached_tokens: int


class BlockManager:
    """Hands out `num_blocks` blocks of `block_size` token positions each."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise BlockManagerError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_count = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest-freed first
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0
        # Block stored / removed events for the router's KV index; None (the default) costs nothing.
        self.events: KVEventLog | None = None
        # Host / disk tiers below the pool (attach_tiers); None: an evicted block is simply lost.
        self.tiers: BlockTiers | None = None
        self.tier_hit_tokens = 0  # prefix hits reloaded from a tier (also counted in prefix_hit_tokens)
        # Called (hash, block) when `mark_computed` registers a block (a shared store puts it at once).
        self.on_computed: Callable[[int, int], None] | None = None

    def attach_tiers(self, tiers: BlockTiers) -> None:
        """Offload evicted hashed blocks to `tiers` and reload them on a prefix hit. While a tier holds
        an evicted block no "removed" event is published (the worker still has it: the router keeps
        routing its prefix here); `tier_dropped` publishes it when the block leaves the last tier."""
        self.tiers = tiers

    def tier_dropped(self, h: int) -> None:
        """Chain hash `h` left the last tier: publish "removed" unless the device holds it again."""
        if h not in self._hash_to_block and self.events is not None:
            self.events.record(h, True)

    # ---- queries -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free_blocks

    @property
    def prefix_hit_rate(self) -> float:
        """prefix_hit_tokens / prefix_query_tokens over successful allocations (0.0 before any)."""
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    def ref_count(self, block_id: int) -> int:
        """How many block tables hold `block_id`."""
        return self._ref_count[self._check_id(block_id)]

    def cached_hash(self, block_id: int) -> int | None:
        """The chained hash `block_id` is registered under, or None."""
        return self._hash[self._check_id(block_id)]

    def stored_hashes(self) -> list[int]:
        """Every chain hash a new request can hit now (referenced or evictable registered blocks): the
        full snapshot that `events` are deltas to), those held by a tier included."""
        if self.tiers is None:
            return list(self._hash_to_block)
        return list(dict.fromkeys([*self._hash_to_block, *self.tiers.hashes()]))

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that cover `num_tokens` positions."""
        return -(-num_tokens // self.block_size)

    # ---- allocation ----------------------------------------------------------------------------

    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        """Whether `allocate(token_ids)` would succeed now."""
        hits, _ = self._plan(token_ids)
        num_new, pinned = self._budget(hits, len(token_ids))
        return num_new <= self._available_excluding(pinned)

    def allocate(self, token_ids: Sequence[int]) -> Allocation:
        """Blocks for a new sequence of `token_ids`, reusing cached full blocks of its prefix (device
        blocks, or blocks reloaded from a tier into fresh device blocks).

        At most (len - 1) // block_size leading blocks come from the cache, so at least the last
        token is always computed (its logits are needed). Raises NoFreeBlocksError, with no state
        changed, when the remaining blocks cannot be found. A tier entry that fails to load (corrupt or
        missing) ends the cached prefix there: the rest is computed.
        """
        hits, hashes = self._plan(token_ids)
        num_new, pinned = self._budget(hits, len(token_ids))
        available = self._available_excluding(pinned)
        if num_new > available:
            raise NoFreeBlocksError(num_new, available)
        payloads: dict[int, tuple[Any, str]] = {}
        for k, block in enumerate(hits):
            if block is None:
                assert self.tiers is not None
                loaded = self.tiers.load(hashes[k])
                if loaded is None:
                    hits = hits[:k]
                    break
                payloads[k] = loaded
        for block in hits:
            if block is not None:
                if self._ref_count[block] == 0:
                    del self._evictable[block]
                self._ref_count[block] += 1
        table: list[int] = []
        for k, hit in enumerate(hits):
            table.append(hit if hit is not None else self._reload(hashes[k], *payloads[k]))
        table += [self._take_fresh_block() for _ in range(self.blocks_needed(len(token_ids)) - len(hits))]
        self.prefix_hit_tokens += len(hits) * self.block_size
        self.prefix_query_tokens += len(token_ids)
        return Allocation(block_table=table, num_cached_tokens=len(hits) * self.block_size)

    def pin_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Take one more reference to each device block of the cached full-block prefix of `token_ids`
        (stopping at the first block not in the pool) and return them: a session lease keeps them from
        eviction until `free` of the returned table. Takes nothing from the tiers."""
        table: list[int] = []
        if not self.enable_prefix_caching:
            return table
        parent: int | None = None
        for k in range(len(token_ids) // self.block_size):
            parent = block_hash(parent, token_ids[k * self.block_size : (k + 1) * self.block_size])
            block = self._hash_to_block.get(parent)
            if block is None:
                break
            if self._ref_count[block] == 0:
                del self._evictable[block]
            self._ref_count[block] += 1
            table.append(block)
        return table

    def allocate_fresh(self, num_tokens: int) -> list[int]:
        """Unshared blocks covering `num_tokens` positions, for KV that will be written from elsewhere
        (a decode worker receiving a prompt's latent). No prefix matching: a received block is never
        aliased with a cached one. Raises NoFreeBlocksError, with nothing allocated, when short."""
        needed = self.blocks_needed(num_tokens)
        if needed > self.num_free_blocks:
            raise NoFreeBlocksError(needed, self.num_free_blocks)
        return [self._take_fresh_block() for _ in range(needed)]

    def can_append(self, block_table: Sequence[int], num_tokens_after: int) -> bool:
        """Whether `append_slot(block_table, num_tokens_after)` would succeed now."""
        return self.blocks_needed(num_tokens_after) - len(block_table) <= self.num_free_blocks

    def append_slot(self, block_table: list[int], num_tokens_after: int) -> bool:
        """Grow `block_table` in place to cover `num_tokens_after` positions (decode, chunked prefill).

        Returns whether blocks were added. Raises NoFreeBlocksError, with the table unchanged,
        when the pool cannot supply them.
        """
        num_new = self.blocks_needed(num_tokens_after) - len(block_table)
        if num_new <= 0:
            return False
        if num_new > self.num_free_blocks:
            raise NoFreeBlocksError(num_new, self.num_free_blocks)
        block_table.extend(self._take_fresh_block() for _ in range(num_new))
        return True

    def mark_computed(
        self, block_table: Sequence[int], token_ids: Sequence[int], num_computed_tokens: int
    ) -> None:
        """Register every full block whose positions [0, num_computed_tokens) are all computed.

        Idempotent and cheap to call every step: blocks are registered in prefix order, so hashing
        resumes after the last registered block of the table. When another block already holds the
        same hash (two sequences computed the same prefix at once) the existing entry is kept and
        this block stays private; it becomes plain free when released.
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(num_computed_tokens, len(token_ids)) // self.block_size
        if num_full > len(block_table):
            raise BlockManagerError(
                f"{num_computed_tokens} computed tokens need {num_full} blocks, table has {len(block_table)}"
            )
        first = num_full
        while first > 0 and self._hash[block_table[first - 1]] is None:
            first -= 1
        parent = self._hash[block_table[first - 1]] if first > 0 else None
        for k in range(first, num_full):
            block = block_table[k]
            parent = block_hash(parent, token_ids[k * self.block_size : (k + 1) * self.block_size])
            self._register(block, parent)
            if self.on_computed is not None and self._hash_to_block[parent] == block:
                self.on_computed(parent, block)

    def free(self, block_table: Sequence[int]) -> None:
        """Drop one reference to each block of `block_table` (the caller must not use it again).

        Blocks are released tail first, so a sequence's prefix blocks are the most recently freed
        and the last to be evicted. Raises BlockManagerError on a double free, before changing anything.
        """
        drops: dict[int, int] = {}
        for block in block_table:
            drops[self._check_id(block)] = drops.get(block, 0) + 1
        for block, count in drops.items():
            if count > self._ref_count[block]:
                raise BlockManagerError(f"double free of block {block} (ref count {self._ref_count[block]})")
        for block in reversed(block_table):
            self._ref_count[block] -= 1
            if self._ref_count[block] > 0:
                continue
            h = self._hash[block]
            if h is not None and self._hash_to_block.get(h) == block:
                self._evictable[block] = None
            else:
                self._hash[block] = None
                self._free.append(block)

    # ---- internals -----------------------------------------------------------------------------

    def _check_id(self, block_id: int) -> int:
        if not 0 <= block_id < self.num_blocks:
            raise BlockManagerError(f"block id {block_id} is outside [0, {self.num_blocks})")
        return block_id

    def _reload(self, h: int, payload: Any, tier: str) -> int:
        """A fresh block holding `payload` (loaded from `tier`), registered under `h`."""
        assert self.tiers is not None
        block = self._take_fresh_block()
        self.tiers.write(block, payload, tier)
        self._register(block, h)
        self.tier_hit_tokens += self.block_size
        return block

    def _register(self, block: int, h: int) -> None:
        """Give `block` hash `h`; the map keeps an existing entry (then `block` stays private)."""
        self._hash[block] = h
        if self._hash_to_block.setdefault(h, block) == block and self.events is not None:
            self.events.record(h, False)

    def _plan(self, token_ids: Sequence[int]) -> tuple[list[int | None], list[int]]:
        """(the cached prefix: per leading block its device block, or None when a tier holds it; the
        chain hashes of those blocks)."""
        if len(token_ids) == 0:
            raise BlockManagerError("cannot allocate blocks for an empty prompt")
        hits: list[int | None] = []
        hashes: list[int] = []
        if self.enable_prefix_caching:
            parent: int | None = None
            for k in range((len(token_ids) - 1) // self.block_size):
                parent = block_hash(parent, token_ids[k * self.block_size : (k + 1) * self.block_size])
                block = self._hash_to_block.get(parent)
                if block is None and (self.tiers is None or not self.tiers.contains(parent)):
                    break
                hits.append(block)
                hashes.append(parent)
        return hits, hashes

    def _budget(self, hits: Sequence[int | None], num_tokens: int) -> tuple[int, list[int]]:
        """(fresh blocks to reserve, device hits surely reused): every block after the first tier entry
        is budgeted as fresh, since a tier entry that fails to load ends the cached prefix there."""
        pinned: list[int] = []
        for block in hits:
            if block is None:
                break
            pinned.append(block)
        return self.blocks_needed(num_tokens) - len(pinned), pinned

    def _available_excluding(self, hits: Sequence[int]) -> int:
        """Blocks free for new content once `hits` (some possibly evictable) are taken back."""
        revived = sum(1 for block in hits if self._ref_count[block] == 0)
        return self.num_free_blocks - revived

    def _take_fresh_block(self) -> int:
        """A ref-count-1 block with no hash: a free one, else the least recently freed cached one."""
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            h = self._hash[block]
            assert h is not None  # evictable blocks carry the hash the map sends to them
            del self._hash_to_block[h]
            self._hash[block] = None
            offloaded = self.tiers is not None and self.tiers.offload(h, block)
            if self.events is not None and not offloaded:
                self.events.record(h, True)
        self._ref_count[block] = 1
        return block

    def check_invariants(self, live_tables: Iterable[Sequence[int]] | None = None) -> None:
        """Raise InvariantViolation if the state is inconsistent.

        Checks: each block is in exactly one state; free blocks have no hash; evictable blocks are
        what the hash map points at; every hash-map entry points at a block carrying that hash.
        With `live_tables` (all block tables held by callers), also that each ref count equals the
        number of times its block appears in them.
        """
        free, evictable = set(self._free), set(self._evictable)
        if len(free) != len(self._free) or free & evictable:
            raise InvariantViolation(
                f"a block is listed twice among free {self._free} / evictable {evictable}"
            )
        for block in range(self.num_blocks):
            ref, h = self._ref_count[block], self._hash[block]
            states = (ref > 0) + (block in free) + (block in evictable)
            if ref < 0 or states != 1:
                raise InvariantViolation(
                    f"block {block}: ref {ref}, free {block in free}, evictable {block in evictable}"
                )
            if block in free and h is not None:
                raise InvariantViolation(f"free block {block} still carries hash {h}")
            if block in evictable and (h is None or self._hash_to_block.get(h) != block):
                raise InvariantViolation(
                    f"evictable block {block} (hash {h}) is not reachable through the hash map"
                )
        for h, block in self._hash_to_block.items():
            if self._hash[block] != h:
                raise InvariantViolation(
                    f"hash map sends {h} to block {block}, which carries {self._hash[block]}"
                )
        if live_tables is not None:
            counts = [0] * self.num_blocks
            for table in live_tables:
                for block in table:
                    counts[block] += 1
            if counts != self._ref_count:
                bad = [b for b in range(self.num_blocks) if counts[b] != self._ref_count[b]]
                raise InvariantViolation(
                    f"ref counts disagree with live tables at blocks {bad}: "
                    f"{[(self._ref_count[b], counts[b]) for b in bad]}"
                )
