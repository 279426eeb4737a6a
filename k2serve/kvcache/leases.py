"""Session leases (issue 18 item 4, agent pauses): while an agent's tool runs between two turns of a
session, the blocks of the session's context stay referenced, so the prefix cache does not evict them
and the next turn finds them on the device.

A lease is one extra reference (BlockManager.pin_prefix) to the cached full blocks of the finished
turn's tokens (prompt + output). It ends when the session's next turn arrives (`release`), when
`lease_s` seconds pass (`expire`, called every engine step), or early under pressure when a waiting
request cannot get its blocks otherwise (`relieve`, oldest lease first): a lease never makes a
request fail that would fit without it. No tensors: the block manager's references only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from k2serve.kvcache.block_manager import BlockManager

__all__ = ["SessionLeases"]


class SessionLeases:
    """Leases of `blocks` per session id, `lease_s` seconds long (by `clock`, default monotonic)."""

    def __init__(
        self, blocks: BlockManager, lease_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.blocks = blocks
        self.lease_s = lease_s
        self.clock = clock
        self._leases: OrderedDict[str, tuple[list[int], float]] = OrderedDict()  # oldest first
        self.expired_total = 0  # leases that ran out (not ended by the next turn)
        self.relieved_total = 0  # leases ended early because a request needed the blocks

    @property
    def num_leased_blocks(self) -> int:
        """Block references the leases hold (a block leased by two sessions counts twice)."""
        return sum(len(table) for table, _ in self._leases.values())

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._leases

    def hold(self, session_id: str, token_ids: Sequence[int]) -> int:
        """Lease the cached blocks of `token_ids` for `session_id` (replacing its earlier lease);
        returns the number of blocks leased."""
        self.release(session_id)
        table = self.blocks.pin_prefix(token_ids)
        if table:
            self._leases[session_id] = (table, self.clock() + self.lease_s)
        return len(table)

    def release(self, session_id: str) -> bool:
        """End `session_id`'s lease (its next turn arrived); returns whether it had one."""
        lease = self._leases.pop(session_id, None)
        if lease is None:
            return False
        self.blocks.free(lease[0])
        return True

    def expire(self, now: float | None = None) -> int:
        """End every lease whose time is up; returns how many ended."""
        now = self.clock() if now is None else now
        done = [sid for sid, (_, until) in self._leases.items() if until <= now]
        for sid in done:
            self.release(sid)
        self.expired_total += len(done)
        return len(done)

    def relieve(self, fits: Callable[[], bool]) -> int:
        """End leases, oldest first, until `fits()` (a waiting request can get its blocks) or none is
        left; returns how many ended."""
        n = 0
        while self._leases and not fits():
            self.release(next(iter(self._leases)))
            n += 1
        self.relieved_total += n
        return n

    def release_all(self) -> None:
        """End every lease (engine shutdown or reset)."""
        for sid in list(self._leases):
            self.release(sid)
