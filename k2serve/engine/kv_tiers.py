"""The engine's glue to the local KV tiers (kvcache/tiers.py): built from EngineConfig and attached to
the block manager, so that evicted prefix blocks are offloaded and reloaded on a hit; and to session
leases (kvcache/leases.py), fed by the engine's requests that carry a session id."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from k2serve.engine.config import EngineConfig
from k2serve.engine.protocol import KVTierStats
from k2serve.kvcache.block_manager import BlockManager
from k2serve.kvcache.leases import SessionLeases
from k2serve.kvcache.pool import KVCachePool
from k2serve.kvcache.tiers import TIERS, KVTiers

__all__ = ["EngineLeases", "attach_tiers", "tier_stats"]


def attach_tiers(blocks: BlockManager, pool: KVCachePool, config: EngineConfig) -> KVTiers | None:
    """The host / disk tiers the config asks for, attached to `blocks`; None when it asks for none
    (or sizes them below one block) or prefix caching is off (nothing would ever hit them)."""
    if not config.enable_prefix_caching:
        return None
    tiers = KVTiers(
        pool,
        host_bytes=config.kv_offload_host_bytes,
        disk_dir=config.kv_offload_dir,
        disk_bytes=config.kv_offload_disk_bytes,
        on_dropped=blocks.tier_dropped,
    )
    if not tiers.enabled:
        return None
    blocks.attach_tiers(tiers)
    return tiers


class _Finished(Protocol):
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finished: bool


class EngineLeases:
    """Session leases of one engine: which request belongs to which session, a lease on the blocks of
    each finished session turn, ended by the session's next turn, its time, or a request that needs
    the blocks (see SessionLeases)."""

    def __init__(self, blocks: BlockManager, lease_s: float) -> None:
        self.leases = SessionLeases(blocks, lease_s)
        self._session_of: dict[str, str] = {}

    @classmethod
    def build(cls, blocks: BlockManager, config: EngineConfig) -> EngineLeases | None:
        """Leases as the config asks (kv_session_lease_s > 0 with prefix caching), else None."""
        if config.kv_session_lease_s <= 0 or not config.enable_prefix_caching:
            return None
        return cls(blocks, config.kv_session_lease_s)

    def added(self, request_id: str, session_id: str | None) -> None:
        """A request arrived: the next turn of `session_id` ends that session's lease."""
        if session_id:
            self.leases.release(session_id)
            self._session_of[request_id] = session_id

    def dropped(self, request_id: str) -> None:
        """A request was aborted: no lease for it."""
        self._session_of.pop(request_id, None)

    def before_schedule(self, blocks: BlockManager, waiting_tokens: list[int] | None) -> None:
        """Expire leases; with a waiting request at the queue head (`waiting_tokens`) that cannot get
        its blocks, end leases (oldest first) until it can."""
        self.leases.expire()
        if waiting_tokens is not None:
            self.leases.relieve(lambda: blocks.can_allocate(waiting_tokens))

    def after_step(self, outputs: Iterable[_Finished]) -> None:
        """Lease the blocks of every finished session turn."""
        for o in outputs:
            if o.finished:
                session_id = self._session_of.pop(o.request_id, None)
                if session_id is not None:
                    self.leases.hold(session_id, o.prompt_token_ids + o.token_ids)


def tier_stats(tiers: KVTiers | None, leases: EngineLeases | None) -> KVTierStats | None:
    """A snapshot of the tiers' counters and the leased blocks for metrics; None with neither."""
    if tiers is None and leases is None:
        return None
    leased = leases.leases.num_leased_blocks if leases is not None else 0
    if tiers is None:
        zero = dict.fromkeys(TIERS, 0)
        return KVTierStats(
            zero, zero, dict.fromkeys(TIERS, 0.0), zero, dict.fromkeys(TIERS, 0.0), zero, 0, leased
        )
    st = tiers.stats
    return KVTierStats(
        hit_tokens=dict(st.hit_tokens),
        offload_bytes=dict(st.offload_bytes),
        offload_seconds=dict(st.offload_seconds),
        reload_bytes=dict(st.reload_bytes),
        reload_seconds=dict(st.reload_seconds),
        blocks={"host": len(tiers.host or ()), "disk": len(tiers.disk or ())},
        corrupt_blocks=st.corrupt_blocks,
        leased_blocks=leased,
    )
