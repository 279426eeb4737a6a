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
    "KV_TIER_NAMES",
    "KVEventLog",
    "NoFreeBlocksError",
    "PendingReload",
    "tier_code",
    "tier_name",
]

DEVICE = "device"  # the tier name of the device pool in KV events
# Tier names by their number in the KV events on the wire (registry.proto KVTier): any tier other than
# these goes out as "shared" (3), a store shared across workers.
KV_TIER_NAMES = (DEVICE, "host", "disk", "shared")


def tier_code(name: str) -> int:
    """The wire number of tier `name` (KV_TIER_NAMES; an unknown tier is a shared one)."""
    return KV_TIER_NAMES.index(name) if name in KV_TIER_NAMES else 3


def tier_name(code: int) -> str:
    """The tier name of wire number `code` (an unknown number: "shared")."""
    return KV_TIER_NAMES[code] if 0 <= code < len(KV_TIER_NAMES) else "shared"


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
    manager stays free of tensors). Optional: `tier_of(h) -> str | None`, the tier holding `h`, named in
    the KV events (without it a held block is published as "host")."""

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

    An event is (chain hash, removed, tier): stored on "device" when a computed full block is registered
    under its hash (only the block the hash map points at: a duplicate computed at the same time is
    private and never reported), removed when that block is evicted and its hash forgotten (with tiers
    attached: when it leaves the last tier). With tiers a block evicted into a tier is "offloaded":
    stored with that tier ("host", "disk"), again when it moves to a lower tier, and its reload publishes
    stored on "device" again; the router's index keeps the latest tier per worker (the cheapest place
    the worker holds it: a block in the pool is never published with a lower tier). These are the
    hashes vLLM's and Dynamo's KV events carry. The log holds at most `max_events`; past that it forgets them all and
    says so (`drain` returns overflowed=True): the reader must then resynchronise from a full snapshot
    (`BlockManager.stored_hashes`), so a reader that stops reading never costs more than the bound."""

    def __init__(self, max_events: int = 1 << 18) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.max_events = max_events
        self._lock = threading.Lock()
        self._events: list[tuple[int, bool, str]] = []
        self._overflowed = False

    def record(self, block_hash: int, removed: bool, tier: str = DEVICE) -> None:
        with self._lock:
            if self._overflowed:
                return
            if len(self._events) >= self.max_events:
                self._events = []
                self._overflowed = True
                return
            self._events.append((block_hash, removed, tier))

    def drain(self) -> tuple[list[tuple[int, bool, str]], bool]:
        """(the events since the last drain or reset, oldest first; whether some were lost: resync)."""
        with self._lock:
            events, overflowed = self._events, self._overflowed
            self._events, self._overflowed = [], False
        return events, overflowed

    def reset(self) -> None:
        """Forget every event (a snapshot was taken: what came before is in it)."""
        self.drain()


@dataclass
class PendingReload:
    """Blocks held for a new sequence whose cached prefix is partly in a tier, while its tier blocks are
    read (`BlockManager.begin_reload`, then `finish_reload` or `cancel_reload`): nothing else can take
    or evict them, and `cancel_reload` gives every one back.

    device: the leading device hits (one reference each).
    reserved: fresh blocks (no hash) for every position after them, where the tier blocks are copied
        and the rest is computed.
    hashes: chain hashes of the cached blocks after `device`, in order (in a tier or on the device).
    pinned: of those, the ones on the device at the start: hash -> block (one reference each).
    num_tokens: the sequence's tokens.
    """

    device: list[int]
    reserved: list[int]
    hashes: list[int]
    pinned: dict[int, int]
    num_tokens: int

    @property
    def to_load(self) -> list[int]:
        """The chain hashes to read from the tiers."""
        return [h for h in self.hashes if h not in self.pinned]

    @property
    def blocks(self) -> list[int]:
        """Every block this reload holds a reference to."""
        return [*self.device, *self.pinned.values(), *self.reserved]


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
        # Blocks evicted by the running call, offloaded together (one copy) before it returns.
        self._evicted: list[tuple[int, int]] = []

    def attach_tiers(self, tiers: BlockTiers) -> None:
        """Offload evicted hashed blocks to `tiers` and reload them on a prefix hit. While a tier holds
        an evicted block no "removed" event is published (the worker still has it: the router keeps
        routing its prefix here); `tier_dropped` publishes it when the block leaves the last tier."""
        self.tiers = tiers

    def tier_dropped(self, h: int) -> None:
        """Chain hash `h` left the last tier: publish "removed" unless the device holds it again."""
        if h not in self._hash_to_block and self.events is not None:
            self.events.record(h, True)

    def tier_moved(self, h: int, tier: str) -> None:
        """Chain hash `h` moved to `tier` (host -> disk): publish it unless the device holds it."""
        if h not in self._hash_to_block and self.events is not None:
            self.events.record(h, False, tier)

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

    def stored_blocks(self) -> list[tuple[int, str]]:
        """`stored_hashes` with the tier holding each: "device" for the pool's, else the tier's."""
        out = dict.fromkeys(self._hash_to_block, DEVICE)
        if self.tiers is not None:
            for h in self.tiers.hashes():
                out.setdefault(h, self._tier_name(h))
        return list(out.items())

    def _tier_name(self, h: int) -> str:
        """The tier holding `h` for events ("host" for a tier class that does not say)."""
        tier_of = getattr(self.tiers, "tier_of", None)
        return (tier_of(h) if tier_of is not None else None) or "host"

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
        pending = self.begin_reload(token_ids)
        if pending is not None:
            assert self.tiers is not None
            loaded: dict[int, Any] = {}
            for h in pending.to_load:  # in order; a tier entry that fails to load ends the prefix
                got = self.tiers.load(h)
                if got is None:
                    break
                loaded[h] = got
            return self.finish_reload(pending, loaded)
        hits, _ = self._plan(token_ids)
        num_new, pinned = self._budget(hits, len(token_ids))
        available = self._available_excluding(pinned)
        if num_new > available:
            raise NoFreeBlocksError(num_new, available)
        self._take_refs(pinned)
        table = pinned + [self._take_fresh_block() for _ in range(num_new)]
        self._offload_evicted()
        self.prefix_hit_tokens += len(pinned) * self.block_size
        self.prefix_query_tokens += len(token_ids)
        return Allocation(block_table=table, num_cached_tokens=len(pinned) * self.block_size)

    def begin_reload(self, token_ids: Sequence[int]) -> PendingReload | None:
        """When the cached prefix of `token_ids` has a block in a tier: hold its device hits and fresh
        blocks for everything after the leading ones (see PendingReload), so that the tier blocks can
        be read meanwhile (`PendingReload.to_load`) and `finish_reload` cannot run short. None when no
        tier holds a block of the prefix (use `allocate`). Raises NoFreeBlocksError, with no state
        changed, when the blocks cannot be found (the same budget as `allocate`)."""
        hits, hashes = self._plan(token_ids)
        if self.tiers is None or all(b is not None for b in hits):
            return None
        _, device = self._budget(hits, len(token_ids))
        pinned = {hashes[k]: b for k, b in enumerate(hits) if k >= len(device) and b is not None}
        num_new = self.blocks_needed(len(token_ids)) - len(device)
        available = self._available_excluding([*device, *pinned.values()])
        if num_new > available:
            raise NoFreeBlocksError(num_new, available)
        self._take_refs([*device, *pinned.values()])
        reserved = [self._take_fresh_block() for _ in range(num_new)]
        self._offload_evicted()
        return PendingReload(device, reserved, hashes[len(device) :], pinned, len(token_ids))

    def finish_reload(self, pending: PendingReload, loaded: dict[int, Any]) -> Allocation:
        """The allocation of a PendingReload once its tier blocks were read: `loaded` maps chain hashes
        to (payload, tier) from the tiers (missing: not read, corrupt, or timed out). The cached prefix
        runs on while each block is on the device (pinned, or in the pool again by now) or loaded, whose
        payload is copied into a reserved block here (on the caller's thread: the engine's) and
        registered; the rest of the reserved blocks are computed; those left over are freed."""
        assert self.tiers is not None
        table = list(pending.device)
        spare = list(pending.reserved)
        unused_pins = dict(pending.pinned)
        writes: list[tuple[int, int, Any]] = []  # (block, hash, (payload, tier)), copied in one go
        for h in pending.hashes:
            block = unused_pins.pop(h, None)
            if block is None and (block := self._hash_to_block.get(h)) is not None:
                self._take_refs([block])  # back in the pool since (another request computed it)
            if block is not None:
                table.append(block)
                self.free([spare.pop()])  # one reserved block fewer is needed
            elif h in loaded:
                block = spare.pop(0)
                writes.append((block, h, loaded[h]))
                table.append(block)
            else:
                break
        many = getattr(self.tiers, "write_many", None)
        if many is not None:
            many([b for b, _, _ in writes], [got for _, _, got in writes])
        for block, h, got in writes:
            if many is None:
                self.tiers.write(block, *got)
            self._register(block, h)
            self.tier_hit_tokens += self.block_size
        self.free(list(unused_pins.values()))
        num_cached = len(table)
        table += spare
        self.prefix_hit_tokens += num_cached * self.block_size
        self.prefix_query_tokens += pending.num_tokens
        return Allocation(block_table=table, num_cached_tokens=num_cached * self.block_size)

    def cancel_reload(self, pending: PendingReload) -> None:
        """Give back every block of a PendingReload that will not finish (its request was aborted)."""
        self.free(pending.blocks)

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
            table.append(block)
        self._take_refs(table)
        return table

    def allocate_fresh(self, num_tokens: int) -> list[int]:
        """Unshared blocks covering `num_tokens` positions, for KV that will be written from elsewhere
        (a decode worker receiving a prompt's latent). No prefix matching: a received block is never
        aliased with a cached one. Raises NoFreeBlocksError, with nothing allocated, when short."""
        needed = self.blocks_needed(num_tokens)
        if needed > self.num_free_blocks:
            raise NoFreeBlocksError(needed, self.num_free_blocks)
        table = [self._take_fresh_block() for _ in range(needed)]
        self._offload_evicted()
        return table

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
        self._offload_evicted()
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

    def _take_refs(self, blocks: Iterable[int]) -> None:
        """One more reference to each of `blocks` (cached ones: taken back from the evictable list)."""
        for block in blocks:
            if self._ref_count[block] == 0:
                del self._evictable[block]
            self._ref_count[block] += 1

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
        chain: list[int] = []  # the chain hashes of the leading blocks, computed as far as needed
        if self.enable_prefix_caching:
            prefetch = getattr(self.tiers, "prefetch", None)  # a tier that can look up many at once
            n = (len(token_ids) - 1) // self.block_size
            for k in range(n):
                self._extend_chain(chain, token_ids, k + 1)
                h = chain[k]
                block = self._hash_to_block.get(h)
                if block is None and prefetch is not None:  # the first block not on the device
                    self._extend_chain(chain, token_ids, n)
                    prefetch(chain[k:])
                    prefetch = None
                if block is None and (self.tiers is None or not self.tiers.contains(h)):
                    break
                hits.append(block)
        return hits, chain[: len(hits)]

    def device_prefix_tokens(self, token_ids: Sequence[int], chain: list[int]) -> int:
        """Tokens of `token_ids`' leading blocks that the device pool holds computed now (at most
        (len - 1) // block_size blocks, as `allocate` serves; no tier is asked, nothing changes):
        what a waiting prompt will not compute when admitted now. `chain`: the caller's memo of the
        prompt's chain hashes (extended here only as far as the hits go), so that asking again each
        step costs dict lookups, not hashing."""
        if not self.enable_prefix_caching:
            return 0
        k, n = 0, (len(token_ids) - 1) // self.block_size
        while k < n:
            self._extend_chain(chain, token_ids, k + 1)
            if chain[k] not in self._hash_to_block:
                break
            k += 1
        return k * self.block_size

    def _extend_chain(self, chain: list[int], token_ids: Sequence[int], end: int) -> None:
        """Append to `chain` (the chain hashes of `token_ids`' first len(chain) blocks) those of the
        blocks up to `end` - 1."""
        bs = self.block_size
        for k in range(len(chain), end):
            chain.append(block_hash(chain[-1] if chain else None, token_ids[k * bs : (k + 1) * bs]))

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
            if self.tiers is not None:
                self._evicted.append((h, block))  # offloaded by _offload_evicted before the call returns
            elif self.events is not None:
                self.events.record(h, True)
        self._ref_count[block] = 1
        return block

    def _offload_evicted(self) -> None:
        """Offload the blocks this call evicted (all at once: one copy out of the pool where the tiers
        can) and publish where each went. Runs before any caller can write the blocks again."""
        evicted, self._evicted = self._evicted, []
        if not evicted:
            return
        assert self.tiers is not None
        many = getattr(self.tiers, "offload_many", None)
        held = many(evicted) if many is not None else [self.tiers.offload(h, b) for h, b in evicted]
        if self.events is None:
            return
        for (h, _), offloaded in zip(evicted, held, strict=True):
            if not offloaded:
                self.events.record(h, True)
            elif self.tiers.contains(h):  # else pushed out of the last tier already, "removed" published
                self.events.record(h, False, self._tier_name(h))

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
