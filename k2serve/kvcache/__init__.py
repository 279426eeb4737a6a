"""The paged MLA latent cache: block pool, block manager with prefix caching, and the shared block hash."""

from __future__ import annotations

from typing import Any

from k2serve.kvcache.block_manager import (
    Allocation,
    BlockManager,
    BlockManagerError,
    InvariantViolation,
    NoFreeBlocksError,
)
from k2serve.kvcache.hashing import BlockHashError, block_hash, chain_hashes

__all__ = [
    "Allocation",
    "BlockHashError",
    "BlockManager",
    "BlockManagerError",
    "InvariantViolation",
    "KVCachePool",
    "KVCachePoolError",
    "NoFreeBlocksError",
    "block_hash",
    "chain_hashes",
]


def __getattr__(name: str) -> Any:
    # The pool needs torch; import it lazily so the router can use the block hash without torch.
    if name in ("KVCachePool", "KVCachePoolError"):
        from k2serve.kvcache import pool

        return getattr(pool, name)
    raise AttributeError(name)
