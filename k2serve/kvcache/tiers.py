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

With `async_io` (the engine's default) the slow parts run on two background threads, overlapped with
the engine's steps: an offload copies the evicted block's rows into a staging tensor on the engine
thread (a memcpy that finishes before the block is reused) and, where it goes to the disk tier, queues
the checksum and file write on a writer thread (a bounded queue: when it is full the offload is
dropped and counted, the step never waits; the bound is checked once per batch of evictions, so one
batch is queued whole even past it: its rows are already copied out of the pool, and a long context
evicted at once, e.g. 2,000 blocks of a 32K-token prompt, must not lose all but the first few hundred); `start_load` reads and verifies a list of blocks on a
reader thread into staging tensors (a future), and the engine copies them into the pool on its own
thread (`write`; no other thread writes the pool). A block queued for the disk is served from its
staging tensor until written. Drops found on a background thread reach `on_dropped` on the engine
thread (`poll`), as do tier changes (`on_moved`, for the router's KV events).

Shutdown (`close`, called by the engine's close: engine/llm_engine.py): the writes still queued are
finished and the threads stopped, within a bounded time (a stuck disk must not hang a worker's exit: what
is not written by then is logged and lost). With a `namespace` (the model / dtype / layout fingerprint,
engine/kv_tiers.py `store_namespace`) the disk tier outlives its process: the directory keeps a marker
file with the namespace, and the next engine on the same directory with the same namespace adopts the
block files it finds (verified on load like any other); files of another namespace, or of none, are
deleted (their bytes may belong to another model: never read them).
"""

from __future__ import annotations

import logging
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from k2serve.kvcache.pool import KVCachePool

__all__ = [
    "CLOSE_TIMEOUT_S",
    "TIERS",
    "DiskTier",
    "HostTier",
    "KVTiers",
    "Loaded",
    "TierStats",
    "framed_bytes",
    "pack_block",
    "run_bounded",
    "unpack_block",
]

logger = logging.getLogger(__name__)

TIERS = ("host", "disk")
_MAGIC = b"K2KVBLK1"
_HEADER = struct.Struct("<8sQQQ")  # magic, payload length, xxh3-128 low, high
_SUFFIX = ".kvblock"
NAMESPACE_FILE = "k2kv-namespace"  # the disk tier's marker: whose blocks the directory holds
CLOSE_TIMEOUT_S = 10.0  # the default bound of a tier's `close` (queued writes, running reads)


def run_bounded(fn: Callable[[], object], timeout_s: float, name: str) -> bool:
    """Run `fn()` on a daemon thread named `name` and wait for it at most `timeout_s` seconds; returns
    whether it finished (else it is left running: a daemon thread does not hold up the process's exit).
    An exception in `fn` is logged and counts as finished. What a shutdown uses for every wait that a
    stuck disk or store could make endless."""
    done = threading.Event()

    def run() -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - logged: a shutdown step must not kill the shutdown
            logger.exception("%s failed", name)
        finally:
            done.set()

    threading.Thread(target=run, name=name, daemon=True).start()
    return done.wait(max(0.0, timeout_s))


def _digest(data: bytes | memoryview) -> tuple[int, int]:
    d = xxhash.xxh3_128_intdigest(data)
    return d & ((1 << 64) - 1), d >> 64


def framed_bytes(payload_bytes: int) -> int:
    """The size of a `pack_block` frame of a `payload_bytes`-byte payload."""
    return _HEADER.size + payload_bytes


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
    dropped_offloads: int = 0  # offloads to disk dropped because the writer's queue was full (async)


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
    `capacity_blocks` files: header (magic, length, XXH3-128 of the payload) + payload.

    `namespace`: whose blocks these are (see the module docstring). With one, the files a previous
    process left under the same namespace are adopted (oldest first by modification time, the newest
    `capacity_blocks` kept) and any other block files are deleted; without one, files found are ignored
    (this process never reads a file it did not write)."""

    def __init__(
        self, directory: str | os.PathLike[str], capacity_blocks: int, namespace: str | None = None
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity_blocks = capacity_blocks
        self._files: OrderedDict[int, None] = OrderedDict()  # files held, LRU order
        self.adopted = 0  # block files taken over from a previous process (same namespace)
        if namespace is not None:
            self._adopt(namespace)

    def _adopt(self, namespace: str) -> None:
        """Take over the block files of `namespace` left in the directory; delete any other's (and
        write the marker)."""
        marker = self.directory / NAMESPACE_FILE
        try:
            found = marker.read_text().strip()
        except OSError:
            found = None
        files: list[tuple[float, int, Path]] = []
        for f in self.directory.glob(f"*{_SUFFIX}"):
            try:
                files.append((f.stat().st_mtime, int(f.name[: -len(_SUFFIX)], 16), f))
            except (OSError, ValueError):  # vanished, or not a name this tier writes
                continue
        if found != namespace:
            for _, _, f in files:
                f.unlink(missing_ok=True)
            for f in self.directory.glob(f".*{_SUFFIX}.tmp"):
                f.unlink(missing_ok=True)
            tmp = self.directory / f".{NAMESPACE_FILE}.{os.getpid()}.tmp"
            tmp.write_text(namespace + "\n")
            os.replace(tmp, marker)
            if files:
                logger.info(
                    "KV disk tier: deleted %d block files of another model or format in %s",
                    len(files),
                    self.directory,
                )
            return
        for _, h, _ in sorted(files):
            self._files[h] = None
        self.adopted = len(self._files)
        while len(self._files) > self.capacity_blocks:
            old, _ = self._files.popitem(last=False)
            self.path(old).unlink(missing_ok=True)
            self.adopted -= 1
        if self.adopted:
            logger.info("KV disk tier: adopted %d block files in %s", self.adopted, self.directory)

    def path(self, h: int) -> Path:
        """The file of chain hash `h`."""
        return self.directory / f"{h:016x}{_SUFFIX}"

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
        self.write_file(h, payload)
        return self.add(h)

    def write_file(self, h: int, payload: bytes) -> None:
        """Checksum `payload` and write the file of `h` (temporary file + rename). I/O only: no
        bookkeeping, so that a background thread can run it outside the tiers' lock; `add` follows."""
        tmp = self.directory / f".{h:016x}.{os.getpid()}.{threading.get_ident()}{_SUFFIX}.tmp"
        with open(tmp, "wb") as f:
            f.write(pack_block(payload))
        os.replace(tmp, self.path(h))

    def add(self, h: int) -> list[int]:
        """Count the written file of `h` (most recent); returns the hashes whose files were deleted to
        stay within capacity."""
        self._files[h] = None
        self._files.move_to_end(h)
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
        data = self.read_verified(h)
        if data is None:
            self.discard(h)
            return None
        self.touch(h)
        return data

    def read_verified(self, h: int) -> bytes | None:
        """The payload in the file of `h` if it is whole and passes its checksum, else None. I/O only."""
        try:
            data = self.path(h).read_bytes()
        except OSError:
            return None
        return unpack_block(data)

    def touch(self, h: int) -> None:
        """Mark `h` most recently used (if held)."""
        if h in self._files:
            self._files.move_to_end(h)

    def discard(self, h: int) -> None:
        """Forget `h` and delete its file."""
        self._files.pop(h, None)
        self.path(h).unlink(missing_ok=True)

    def hashes(self) -> list[int]:
        return list(self._files)


Loaded = tuple[torch.Tensor, str]
"""A verified block payload and the tier it came from (`load`, `start_load`)."""


class KVTiers:
    """The host and disk tiers of one engine's pool (either may be absent: capacity 0 / no directory).

    `on_dropped(h)` is called when chain hash `h` leaves the last tier holding it; `on_moved(h, tier)`
    when a held block moves to another tier (host -> disk). Both only on the engine thread (the one
    calling `offload`, `load`, `write`, `poll`). With `async_io` disk writes and `start_load` reads run
    on background threads (see the module docstring); `write_queue_blocks` bounds the writes queued
    (checked once per batch of evictions).
    `read_hook(h)`, when set, runs on the reading thread before each block is read (tests inject a slow
    tier with it). `namespace`: the disk tier's (see DiskTier): blocks it holds survive this process."""

    def __init__(
        self,
        pool: KVCachePool,
        host_bytes: int = 0,
        disk_dir: str | os.PathLike[str] | None = None,
        disk_bytes: int = 0,
        on_dropped: Callable[[int], None] | None = None,
        async_io: bool = False,
        write_queue_blocks: int = 64,
        namespace: str | None = None,
    ) -> None:
        if host_bytes < 0 or disk_bytes < 0:
            raise ValueError(f"tier sizes must be >= 0 bytes, got host {host_bytes}, disk {disk_bytes}")
        if disk_bytes and disk_dir is None:
            raise ValueError("a disk tier size needs a directory (kv_offload_dir)")
        if write_queue_blocks < 1:
            raise ValueError(f"write_queue_blocks must be >= 1, got {write_queue_blocks}")
        self.pool = pool
        self.block_bytes = pool.bytes_per_block
        self.host = HostTier(host_bytes // self.block_bytes) if host_bytes >= self.block_bytes else None
        self.disk = (
            DiskTier(disk_dir, disk_bytes // self.block_bytes, namespace)
            if disk_dir is not None and disk_bytes >= self.block_bytes
            else None
        )
        self.on_dropped = on_dropped
        self.on_moved: Callable[[int, str], None] | None = None
        self.read_hook: Callable[[int], None] | None = None
        self.stats = TierStats()
        self.async_io = async_io
        # Guards the tiers' maps and the stats between the engine thread and the background threads.
        self._lock = threading.RLock()
        # Reads in progress on the reader thread: the writer waits for them (a read is on a request's
        # critical path, a write is not; on a loaded host the two threads otherwise slow each other).
        self._reads = 0
        self._no_reads = threading.Condition(self._lock)
        self._pending: dict[int, torch.Tensor] = {}  # queued for the disk, not written yet
        self._drops: list[int] = []  # left the last tier, not yet told to on_dropped
        self.write_queue_blocks = write_queue_blocks
        # None: stop. Unbounded: `offload_many` bounds it (per batch, see the module docstring).
        self._writes: queue.Queue[tuple[int, torch.Tensor] | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._reader: ThreadPoolExecutor | None = None  # started by the first `start_load` (async_io)
        if async_io and self.disk is not None:
            self._writer = threading.Thread(target=self._write_loop, name="kv-tier-write", daemon=True)
            self._writer.start()

    @property
    def lock(self) -> threading.RLock:
        """The lock guarding the tiers' maps and `stats` (a tier built on these, kvcache/shared_tier.py,
        takes it for the counters it adds to `stats`)."""
        return self._lock

    @property
    def enabled(self) -> bool:
        """Whether any tier can hold a block."""
        return self.host is not None or self.disk is not None

    @property
    def write_queue_depth(self) -> int:
        """Disk writes queued or in progress (async)."""
        return len(self._pending)

    def contains(self, h: int) -> bool:
        """Whether a tier holds chain hash `h` (the disk entry may still turn out corrupt on `load`)."""
        return self.tier_of(h) is not None

    def tier_of(self, h: int) -> str | None:
        """The tier holding chain hash `h` ("host" before "disk"; a block queued for the disk is
        "disk"), or None."""
        with self._lock:
            if self.host is not None and h in self.host:
                return "host"
            if h in self._pending or (self.disk is not None and h in self.disk):
                return "disk"
        return None

    def hashes(self) -> list[int]:
        """Every chain hash a tier holds."""
        return [h for h, _ in self.held()]

    def held(self) -> list[tuple[int, str]]:
        """Every chain hash a tier holds, with that tier (as `tier_of`)."""
        with self._lock:
            out = [(h, "host") for h in self.host.hashes()] if self.host is not None else []
            seen = {h for h, _ in out}
            disk = [*self._pending, *(self.disk.hashes() if self.disk is not None else [])]
            return out + [(h, "disk") for h in dict.fromkeys(disk) if h not in seen]

    def block_payloads(self, blocks: list[int]) -> list[torch.Tensor]:
        """The rows of every layer of each of `blocks`, copied out of the pool into one CPU staging
        tensor (a single gather, whatever the number of blocks: per-block copies cost an operator call
        each, which a loaded host makes slow); per block a contiguous uint8 view of it. The views share
        the batch's storage, which lives while any of them does (a tier may briefly hold more than its
        cap, by at most one batch of evictions)."""
        kv = self.pool.kv
        idx = torch.tensor(blocks, dtype=torch.long, device=kv.device)
        staged = kv.index_select(1, idx).transpose(0, 1).contiguous().to("cpu")
        return [staged[i].view(torch.uint8).reshape(-1) for i in range(len(blocks))]

    def block_payload(self, block: int) -> torch.Tensor:
        """Block `block`'s rows of every layer as a contiguous CPU uint8 tensor (a copy out of the pool)."""
        return self.block_payloads([block])[0]

    def offload(self, h: int, block: int) -> bool:
        """Copy device block `block`, registered under `h`, into the tiers; returns whether a tier holds
        it afterwards."""
        return self.offload_many([(h, block)])[0]

    def offload_many(self, evicted: Sequence[tuple[int, int]]) -> list[bool]:
        """`offload` of each (chain hash, device block) of `evicted`, in order, with one copy out of the
        pool for all of them; per block whether a tier holds it afterwards. The copy is done when this
        returns (the blocks may be reused); disk writes may still be queued (async_io)."""
        held: list[bool] = []
        with self._lock:
            admit = len(self._pending) < self.write_queue_blocks  # this batch may queue disk writes
            fresh = [(h, b) for h, b in evicted if not self.contains(h)]
            t0 = time.perf_counter()
            payloads = (
                dict(zip((h for h, _ in fresh), self.block_payloads([b for _, b in fresh]), strict=True))
                if fresh
                else {}
            )
            if self.host is not None and payloads:
                self.stats.offload_seconds["host"] += time.perf_counter() - t0
            for h, _ in evicted:
                payload = payloads.pop(h, None)
                if payload is None:  # inclusive tiers: a reloaded block is still there
                    if self.host is not None and h in self.host:
                        self.host.get(h)
                    held.append(True)
                elif self.host is not None:
                    self.stats.offload_bytes["host"] += payload.numel()
                    for old, data in self.host.put(h, payload):
                        if self._to_disk(old, data, admit) and self.on_moved is not None:
                            self.on_moved(old, "disk")
                    held.append(True)
                else:  # the caller publishes a block that found no tier
                    held.append(self._to_disk(h, payload, admit, report=False))
        self.poll()
        return held

    def _to_disk(self, h: int, payload: torch.Tensor, admit: bool, report: bool = True) -> bool:
        """Send `payload` of `h` to the disk tier (queued with async_io, if `admit`: the write queue was
        below its bound when this batch of offloads began); False when it is dropped (then `on_dropped`
        hears of it when `report`: a block pushed out of the host tier)."""
        if self.disk is None:
            if report:
                self._drops.append(h)
            return False
        if self._writer is not None:
            if h in self._pending or h in self.disk:
                return True
            if not admit:  # the queue was full when this batch began: drop, never wait
                self.stats.dropped_offloads += 1
                if report:
                    self._drops.append(h)
                return False
            self._writes.put_nowait((h, payload))
            self._pending[h] = payload
            return True
        t0 = time.perf_counter()
        raw = payload.numpy().tobytes()
        self._drops.extend(self.disk.put(h, raw))
        self.stats.offload_bytes["disk"] += len(raw)
        self.stats.offload_seconds["disk"] += time.perf_counter() - t0
        return True

    def _write_loop(self) -> None:
        """The writer thread: checksum and write queued blocks, then count them in the disk tier."""
        assert self.disk is not None
        while True:
            item = self._writes.get()
            try:
                if item is None:
                    return
                h, payload = item
                with self._lock:
                    self._no_reads.wait_for(lambda: self._reads == 0, timeout=1.0)
                t0 = time.perf_counter()
                raw = payload.numpy().tobytes()
                try:
                    self.disk.write_file(h, raw)
                except OSError as e:  # a full or failing disk: the block is lost, never wrong
                    logger.warning("KV disk tier: writing block %016x failed (%s); dropped", h, e)
                    with self._lock:
                        self._pending.pop(h, None)
                        self._drops.append(h)
                    continue
                with self._lock:
                    if self._pending.pop(h, None) is not None:
                        self._drops.extend(self.disk.add(h))
                    else:  # discarded while queued (a failed load): do not resurrect it
                        self.disk.path(h).unlink(missing_ok=True)
                    self.stats.offload_bytes["disk"] += len(raw)
                    self.stats.offload_seconds["disk"] += time.perf_counter() - t0
            finally:
                self._writes.task_done()

    def poll(self) -> None:
        """On the engine thread: tell `on_dropped` about blocks that left the last tier (found by any
        thread) and still are in none."""
        with self._lock:
            drops, self._drops = self._drops, []
            gone = [h for h in drops if not self.contains(h)]
        if self.on_dropped is not None:
            for h in gone:
                self.on_dropped(h)

    def flush(self) -> None:
        """Wait until every queued disk write is done (tests, benchmarks, shutdown)."""
        if self._writer is not None:
            self._writes.join()

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Finish the queued disk writes and stop the background threads, waiting at most `timeout_s`
        in all; returns whether everything finished. What is still queued or running after that (a
        stuck disk) is logged and left behind: the threads are daemons, the process can exit, and those
        blocks are lost (never half-written: a file appears only by its final rename). Reads not
        started are cancelled. Idempotent."""
        deadline = time.monotonic() + timeout_s
        finished = True
        writer, self._writer = self._writer, None
        if writer is not None:
            self._writes.put_nowait(None)
            writer.join(max(0.0, deadline - time.monotonic()))
            if writer.is_alive():
                finished = False
                logger.warning(
                    "KV disk tier: %d queued block writes not done after %.1f s at close; they are lost",
                    len(self._pending),
                    timeout_s,
                )
        reader, self._reader = self._reader, None
        if reader is not None and not run_bounded(
            lambda: reader.shutdown(wait=True, cancel_futures=True),
            deadline - time.monotonic(),
            "kv-tier-close",
        ):
            finished = False
            logger.warning("KV tiers: a block read still runs after %.1f s at close; left behind", timeout_s)
        return finished

    def _read(self, h: int) -> Loaded | None:
        """`h`'s verified payload and tier, or None (a corrupt or missing disk entry is dropped and
        counted). Any thread; tells nobody (see `load`, `poll`)."""
        if self.read_hook is not None:
            self.read_hook(h)
        t0 = time.perf_counter()
        with self._lock:
            payload = self.host.get(h) if self.host is not None else None
            if payload is not None:
                self.stats.reload_seconds["host"] += time.perf_counter() - t0
                return payload, "host"
            payload = self._pending.get(h)
            if payload is not None:
                self.stats.reload_seconds["disk"] += time.perf_counter() - t0
                return payload, "disk"
            if self.disk is None or h not in self.disk:
                return None
        raw = self.disk.read_verified(h)  # outside the lock: the slow part
        with self._lock:
            if raw is None:
                if h in self.disk:
                    self.stats.corrupt_blocks += 1
                    self.disk.discard(h)
                    self._drops.append(h)
                return None
            self.disk.touch(h)
            self.stats.reload_seconds["disk"] += time.perf_counter() - t0
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8), "disk"

    def load(self, h: int) -> Loaded | None:
        """(payload, tier name) of `h`, verified; None when no tier has a good copy (a corrupt or
        missing disk file is dropped and counted). On the engine thread."""
        got = self._read(h)
        if got is None:
            self.poll()
        return got

    def load_many(self, hashes: Sequence[int]) -> dict[int, Loaded]:
        """The verified payloads of `hashes`, in order, up to the first that no tier has a good copy of
        (a prefix ends there: what follows would be recomputed anyway). Any thread."""
        out: dict[int, Loaded] = {}
        with self._lock:
            self._reads += 1
        try:
            for h in hashes:
                got = self._read(h)
                if got is None:
                    break
                out[h] = got
        finally:
            with self._lock:
                self._reads -= 1
                self._no_reads.notify_all()
        return out

    def start_load(
        self, hashes: Sequence[int], load_many: Callable[[Sequence[int]], dict[int, Loaded]] | None = None
    ) -> Future[dict[int, Loaded]]:
        """`load_many(hashes)` on the reader thread (async_io), else done at once on this one.
        `load_many` defaults to this object's; a tier below these (kvcache/shared_tier.py) passes its
        own, which reads these tiers first, so that its reads run on the same thread. With async_io the
        reader thread is started on first use when no local tier started it (a shared tier alone)."""
        load = self.load_many if load_many is None else load_many
        if not self.async_io:
            done: Future[dict[int, Loaded]] = Future()
            done.set_result(load(hashes))
            return done
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="kv-tier-read")
        return self._reader.submit(load, list(hashes))

    def write(self, block: int, payload: torch.Tensor, tier: str) -> None:
        """Copy a payload from `load` into device block `block` and count the hit for `tier`. On the
        engine thread (the only one that writes the pool)."""
        self.write_many([block], [(payload, tier)])

    def write_many(self, blocks: Sequence[int], loaded: Sequence[Loaded]) -> None:
        """`write` of each payload into the block at the same index, with one copy into the pool."""
        if not blocks:
            return
        t0 = time.perf_counter()
        kv = self.pool.kv
        shape = kv[:, 0].shape
        src = torch.stack([p.view(kv.dtype).view(shape) for p, _ in loaded], dim=1)
        idx = torch.tensor(list(blocks), dtype=torch.long, device=kv.device)
        kv.index_copy_(1, idx, src.to(kv.device))
        seconds = (time.perf_counter() - t0) / len(blocks)
        with self._lock:
            for payload, tier in loaded:
                self.stats.reload_bytes[tier] += payload.numel()
                self.stats.reload_seconds[tier] += seconds
                self.stats.hit_tokens[tier] += self.pool.block_size
