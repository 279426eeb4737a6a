"""The engine's glue to the local KV tiers (kvcache/tiers.py): built from EngineConfig and attached to
the block manager, so that evicted prefix blocks are offloaded and reloaded on a hit."""

from __future__ import annotations

from k2serve.engine.config import EngineConfig
from k2serve.kvcache.block_manager import BlockManager
from k2serve.kvcache.pool import KVCachePool
from k2serve.kvcache.tiers import KVTiers

__all__ = ["attach_tiers"]


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
