"""Local KV cache tiers below the device pool: host memory, then a local disk directory.

When the block manager evicts a registered (hashed) block from the device pool, `KVTiers.offload`
copies its latent rows (all layers: pool.kv[:, block], raw storage bytes, so an fp8 pool's rows are
kept as the raw fp8 bytes) into the host tier, a bounded LRU of blocks in host memory. Blocks pushed
out of the host tier go to the disk tier: one file per block named by its chain hash, written to a
temporary name and renamed (atomic), holding a header with the XXH3-128 checksum of the payload.
Blocks pushed out of the disk tier are gone (the `on_dropped` callback tells the block manager, which
then publishes the "removed" KV event).

On a prefix-cache lookup the block manager asks `contains` for a chain hash that is not in the device
map; `load` returns the verified payload (a corrupt, truncated or missing file drops the entry and
returns None: the caller recomputes those tokens, never uses wrong KV) and `write` copies it into a
fresh device block. The tiers are inclusive: a reloaded block stays in its tier (so evicting it again
costs no copy), which the LRU ages out like any other.

The copies are synchronous (the engine's step waits for them); overlapping them with compute is left.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from k2serve.kvcache.pool import KVCachePool

__all__ = ["TIERS", "DiskTier", "HostTier", "KVTiers", "TierStats", "pack_block", "unpack_block"]

TIERS = ("host", "disk")
_MAGIC = b"K2KVBLK1"
_HEADER = struct.Struct("<8sQQQ")  # magic, payload length, xxh3-128 low, high


def _digest(data: bytes | memoryview) -> tuple[int, int]:
    d = xxhash.xxh3_128_intdigest(data)
    return d & ((1 << 64) - 1), d >> 64


def pack_block(payload: bytes | memoryview) -> bytes:
    """A block payload framed for storage outside the process (a disk file, a shared store): the
    fixed header (magic, payload length, XXH3-128 of the payload) followed by the payload."""
    lo, hi = _digest(payload)
    return _HEADER.pack(_MAGIC, len(payload), lo, hi) + bytes(payload)


def unpack_block(data: bytes) -> bytes | None:
    """The payload of a `pack_block` frame, or None when the frame is truncated, has another magic or
    length, or fails its checksum (never trust a payload that does not verify)."""
    if len(data) < _HEADER.size:
        return None
    magic, length, lo, hi = _HEADER.unpack_from(data)
    body = memoryview(data)[_HEADER.size :]
    if magic != _MAGIC or length != len(body) or _digest(body) != (lo, hi):
        return None
    return data[_HEADER.size :]


@dataclass
class TierStats:
    """Counters of the tiers (cumulative; read by the worker's metrics)."""

    hit_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    offload_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    offload_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIERS, 0.0))
    reload_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    reload_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIERS, 0.0))
    corrupt_blocks: int = 0  # entries dropped because their file failed its checksum, or vanished


class HostTier:
    """A bounded LRU of block payloads (CPU uint8 tensors) in host memory: at most `capacity_blocks`."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __contains__(self, h: int) -> bool:
        return h in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def put(self, h: int, payload: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Store `payload` under `h` (most recent); returns the entries pushed out, oldest first."""
        self._blocks[h] = payload
        self._blocks.move_to_end(h)
        out: list[tuple[int, torch.Tensor]] = []
        while len(self._blocks) > self.capacity_blocks:
            out.append(self._blocks.popitem(last=False))
        return out

    def get(self, h: int) -> torch.Tensor | None:
        """The payload under `h` (marked most recent), or None."""
        payload = self._blocks.get(h)
        if payload is not None:
            self._blocks.move_to_end(h)
        return payload

    def hashes(self) -> list[int]:
        return list(self._blocks)


class DiskTier:
    """One file per block in `directory`, named by its chain hash (16 hex digits), at most
    `capacity_blocks` files: header (magic, length, XXH3-128 of the payload) + payload."""

    def __init__(self, directory: str | os.PathLike[str], capacity_blocks: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity_blocks = capacity_blocks
        self._files: OrderedDict[int, None] = OrderedDict()  # what this process wrote, LRU order

    def path(self, h: int) -> Path:
        """The file of chain hash `h`."""
        return self.directory / f"{h:016x}.kvblock"

    def __contains__(self, h: int) -> bool:
        return h in self._files

    def __len__(self) -> int:
        return len(self._files)

    def put(self, h: int, payload: bytes) -> list[int]:
        """Write `payload` for `h` (atomically: temporary file + rename); returns the hashes whose files
        were deleted to stay within capacity."""
        if h in self._files:
            self._files.move_to_end(h)
            return []
        tmp = self.directory / f".{h:016x}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(pack_block(payload))
        os.replace(tmp, self.path(h))
        self._files[h] = None
        dropped: list[int] = []
        while len(self._files) > self.capacity_blocks:
            old, _ = self._files.popitem(last=False)
            self.path(old).unlink(missing_ok=True)
            dropped.append(old)
        return dropped

    def get(self, h: int) -> bytes | None:
        """The verified payload of `h`, or None when the file is missing, truncated or fails its
        checksum (the entry and its file are then dropped)."""
        if h not in self._files:
            return None
        try:
            data = self.path(h).read_bytes()
        except OSError:
            data = b""
        payload = unpack_block(data)
        if payload is None:
            self.discard(h)
            return None
        self._files.move_to_end(h)
        return payload

    def discard(self, h: int) -> None:
        """Forget `h` and delete its file."""
        self._files.pop(h, None)
        self.path(h).unlink(missing_ok=True)

    def hashes(self) -> list[int]:
        return list(self._files)


class KVTiers:
    """The host and disk tiers of one engine's pool (either may be absent: capacity 0 / no directory).

    `on_dropped(h)` is called when chain hash `h` leaves the last tier holding it."""

    def __init__(
        self,
        pool: KVCachePool,
        host_bytes: int = 0,
        disk_dir: str | os.PathLike[str] | None = None,
        disk_bytes: int = 0,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        if host_bytes < 0 or disk_bytes < 0:
            raise ValueError(f"tier sizes must be >= 0 bytes, got host {host_bytes}, disk {disk_bytes}")
        if disk_bytes and disk_dir is None:
            raise ValueError("a disk tier size needs a directory (kv_offload_dir)")
        self.pool = pool
        self.block_bytes = pool.bytes_per_block
        self.host = HostTier(host_bytes // self.block_bytes) if host_bytes >= self.block_bytes else None
        self.disk = (
            DiskTier(disk_dir, disk_bytes // self.block_bytes)
            if disk_dir is not None and disk_bytes >= self.block_bytes
            else None
        )
        self.on_dropped = on_dropped
        self.stats = TierStats()

    @property
    def enabled(self) -> bool:
        """Whether any tier can hold a block."""
        return self.host is not None or self.disk is not None

    def contains(self, h: int) -> bool:
        """Whether a tier holds chain hash `h` (the disk entry may still turn out corrupt on `load`)."""
        return (self.host is not None and h in self.host) or (self.disk is not None and h in self.disk)

    def hashes(self) -> list[int]:
        """Every chain hash a tier holds."""
        out = self.host.hashes() if self.host is not None else []
        return out + (self.disk.hashes() if self.disk is not None else [])

    def block_payload(self, block: int) -> torch.Tensor:
        """Block `block`'s rows of every layer as a contiguous CPU uint8 tensor (a copy)."""
        rows = self.pool.kv[:, block].contiguous()
        return rows.view(torch.uint8).reshape(-1).to("cpu", copy=True)

    def offload(self, h: int, block: int) -> bool:
        """Copy device block `block`, registered under `h`, into the tiers; returns whether a tier holds
        it afterwards."""
        if self.contains(h):  # inclusive tiers: a reloaded block is still there
            if self.host is not None and h in self.host:
                self.host.get(h)
            return True
        t0 = time.perf_counter()
        payload = self.block_payload(block)
        if self.host is not None:
            self.stats.offload_bytes["host"] += payload.numel()
            pushed = self.host.put(h, payload)
            self.stats.offload_seconds["host"] += time.perf_counter() - t0
            for old, data in pushed:
                self._to_disk(old, data)
            return True
        self._to_disk(h, payload)
        return self.disk is not None

    def _to_disk(self, h: int, payload: torch.Tensor) -> None:
        if self.disk is None:
            self._dropped(h)
            return
        t0 = time.perf_counter()
        raw = payload.numpy().tobytes()
        for old in self.disk.put(h, raw):
            self._dropped(old)
        self.stats.offload_bytes["disk"] += len(raw)
        self.stats.offload_seconds["disk"] += time.perf_counter() - t0

    def _dropped(self, h: int) -> None:
        if self.on_dropped is not None and not self.contains(h):
            self.on_dropped(h)

    def load(self, h: int) -> tuple[torch.Tensor, str] | None:
        """(payload, tier name) of `h`, verified; None when no tier has a good copy (a corrupt or
        missing disk file is dropped and counted)."""
        t0 = time.perf_counter()
        if self.host is not None:
            payload = self.host.get(h)
            if payload is not None:
                self.stats.reload_seconds["host"] += time.perf_counter() - t0
                return payload, "host"
        if self.disk is not None and h in self.disk:
            raw = self.disk.get(h)
            if raw is None:
                self.stats.corrupt_blocks += 1
                self._dropped(h)
                return None
            self.stats.reload_seconds["disk"] += time.perf_counter() - t0
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8), "disk"
        return None

    def write(self, block: int, payload: torch.Tensor, tier: str) -> None:
        """Copy a payload from `load` into device block `block` and count the hit for `tier`."""
        t0 = time.perf_counter()
        dst = self.pool.kv[:, block]
        src = payload.view(self.pool.kv.dtype).view(dst.shape)
        dst.copy_(src, non_blocking=False)
        self.stats.reload_bytes[tier] += payload.numel()
        self.stats.reload_seconds[tier] += time.perf_counter() - t0
        self.stats.hit_tokens[tier] += self.pool.block_size
