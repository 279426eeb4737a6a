"""The one definition of a KV-cache block hash, shared by the router and every worker.

A block hash identifies the *content of a full block together with everything before it*:
block k's hash is computed from block k-1's hash (its parent) and block k's own token ids, so
two sequences share block k's hash only if they agree on all tokens of blocks 0..k.

The hash must be identical across processes, machines and Python versions, so it never uses
Python's `hash()` (salted per process). Layout of the bytes fed to blake2b (8-byte digest):

    parent:  the parent hash as uint64 little-endian, or ROOT_PARENT for the first block
    tokens:  each token id as int64 little-endian

and the digest is read back as an unsigned little-endian 64-bit integer.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

__all__ = ["ROOT_PARENT", "BlockHashError", "block_hash", "chain_hashes"]

# Stands in for the parent of block 0. Any 8 bytes would do; a real parent equal to this value
# is a 64-bit hash collision, no likelier than any other.
ROOT_PARENT = b"k2root\x00\x00"

_UINT64_MAX = (1 << 64) - 1


class BlockHashError(ValueError):
    """A block hash input is out of range (parent not a uint64, token id not an int64, bad block size)."""


def block_hash(parent: int | None, token_ids: Sequence[int]) -> int:
    """Hash one block: `parent` is the previous block's hash (None for the first block).

    Returns an unsigned 64-bit integer. Any number of tokens is accepted, but only full blocks
    are ever registered for sharing (see `chain_hashes`).
    """
    if parent is None:
        parent_bytes = ROOT_PARENT
    elif 0 <= parent <= _UINT64_MAX:
        parent_bytes = parent.to_bytes(8, "little")
    else:
        raise BlockHashError(f"parent hash {parent!r} is not an unsigned 64-bit integer")
    try:
        token_bytes = struct.pack(f"<{len(token_ids)}q", *token_ids)
    except struct.error as e:
        raise BlockHashError(f"token ids must be int64 values, got {list(token_ids)[:8]!r}...: {e}") from e
    digest = hashlib.blake2b(parent_bytes + token_bytes, digest_size=8).digest()
    return int.from_bytes(digest, "little")


def chain_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of every FULL block of `token_ids`; a trailing partial block is left out.

    Element k is `block_hash(element k-1 or None, token_ids[k*block_size:(k+1)*block_size])`.
    """
    if block_size < 1:
        raise BlockHashError(f"block_size must be >= 1, got {block_size}")
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
