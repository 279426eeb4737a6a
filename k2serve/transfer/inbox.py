"""Receiver-side bookkeeping shared by every backend: expected transfers, chunk validation, delivery.

A backend hands each arriving (KVChunkHeader, payload) to `Inbox.accept`; the inbox checks it
against the expected transfer, assembles layers that come in several chunks, calls on_layer for
each complete layer and wakes `wait` when the last layer is in.

Receiving in place: a backend that can receive into any memory first asks `landing_site(header)`
where the chunk's payload belongs (a view of the layer's `place` destination), receives it there
and then calls `accept(..., landed=True)`, which verifies it where it lies. Each landing site handed
out is counted until that accept (or `end_landing` when the receive failed), and `wait` / `cancel`
hold back until the count is zero, so no byte can land in memory the caller has taken back.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from k2serve.proto.kv_transfer_pb2 import KVChunkHeader
from k2serve.transfer.base import (
    ChunkError,
    OnLayer,
    Place,
    TransferError,
    TransferSpec,
    TransferStats,
    TransferTimeout,
)
from k2serve.transfer.checksum import KIND_NAMES, Checksum, checksum

GRPC_SOURCE_PREFIX = "grpc:"  # the gRPC backend's chunk sources start with it
Payload = bytes | memoryview | torch.Tensor
"""Chunk bytes: bytes-like, or a flat uint8 tensor (delivered without a copy when it is a whole layer)."""


@dataclass
class _Transfer:
    spec: TransferSpec
    on_layer: OnLayer
    rows_in: list[int]  # per layer: tokens received so far (chunks arrive in token order)
    done: threading.Event = field(default_factory=threading.Event)
    error: TransferError | None = None
    layers_done: int = 0
    bytes: int = 0
    first_chunk_at: float | None = None
    finished_at: float | None = None
    source: str | None = None
    assembly: torch.Tensor | None = None  # one layer's bytes when layers arrive in several chunks
    busy: threading.Lock = field(default_factory=threading.Lock)  # one chunk of this transfer at a time
    place: Place | None = None
    landing: int = 0  # landing sites handed out whose payload was not accepted or ended yet
    verify_seconds: float = 0.0  # checksumming, summed over chunks
    traceparent: str = ""  # the sender's span, from the first chunk

    @property
    def complete(self) -> bool:
        return self.layers_done == self.spec.num_layers


class Inbox:
    """Expected transfers of one receiver; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # notified when a transfer's landing count drops
        self._transfers: dict[str, _Transfer] = {}
        self._closed_reason: str | None = None

    def expect(self, spec: TransferSpec, on_layer: OnLayer, place: Place | None = None) -> None:
        with self._lock:
            if self._closed_reason is not None:
                raise TransferError(spec.transfer_id, self._closed_reason)
            if spec.transfer_id in self._transfers:
                raise ValueError(f"transfer_id {spec.transfer_id!r} is already expected")
            self._transfers[spec.transfer_id] = _Transfer(spec, on_layer, [0] * spec.num_layers, place=place)

    def landing_site(self, h: KVChunkHeader, source: str, device: torch.device) -> torch.Tensor | None:
        """Where this chunk's payload may be received in place: a flat uint8 view of its rows in
        `place(layer)`, or None (receive it into a buffer; `accept` then names anything wrong).
        A destination on another device than `device` (where this backend receives) is not used.

        A site handed out must end with `accept(..., landed=True)` or `end_landing`.
        """
        with self._lock:
            t = self._transfers.get(h.transfer_id)
            if t is None or t.place is None or t.error is not None or t.done.is_set():
                return None
            if self._header_problem(t, h, source, in_order=False) is not None:
                return None
            spec = t.spec
            t.landing += 1
        try:
            dest = t.place(h.layer)
            if dest is None or dest.device != device:  # e.g. a GPU pool behind a host receiver
                self.end_landing(h.transfer_id)
                return None
            if tuple(dest.shape) != (spec.num_tokens, spec.kv_dim) or dest.dtype != spec.dtype:
                raise ValueError(
                    f"it gave {tuple(dest.shape)} {dest.dtype}, expected ({spec.num_tokens}, {spec.kv_dim}) {spec.dtype}"
                )
            if not dest.is_contiguous():
                raise ValueError("it gave a tensor that is not contiguous")
        except Exception as e:  # noqa: BLE001 - the decode worker's code: its failure fails the transfer
            self.fail(h.transfer_id, TransferError(h.transfer_id, f"place({h.layer}) failed: {e}"))
            self.end_landing(h.transfer_id)
            return None
        rows = dest[h.token_offset : h.token_offset + h.num_tokens]
        return rows.reshape(-1).view(torch.uint8)

    def end_landing(self, transfer_id: str) -> None:
        """A landing site's payload will not be accepted (its receive failed)."""
        with self._lock:
            t = self._transfers.get(transfer_id)
            if t is not None and t.landing > 0:
                t.landing -= 1
                self._settled.notify_all()

    def accept(self, header: KVChunkHeader, payload: Payload, source: str, landed: bool = False) -> bool:
        """Validate one chunk and deliver the layer it completes; True when the transfer is complete.

        landed: payload is the `landing_site` this chunk was received into (its layer is then
        complete without on_layer). Raises ChunkError for a bad chunk (the transfer, if known,
        fails with it) and TransferError when the transfer already failed or on_layer raised.
        """
        try:
            return self._accept(header, payload, source, landed)
        finally:
            if landed:
                self.end_landing(header.transfer_id)

    def _accept(self, header: KVChunkHeader, payload: Payload, source: str, landed: bool) -> bool:
        arrived = time.perf_counter()
        tid = header.transfer_id
        with self._lock:
            t = self._transfers.get(tid)
        if t is None:
            raise ChunkError(tid, "transfer_id", tid, "a transfer expected by this receiver")
        with t.busy:
            if t.error is not None:
                raise t.error
            try:
                layer_view = self._check(t, header, payload, source, landed)
                if t.first_chunk_at is None:
                    t.first_chunk_at = arrived
                    t.source = source
                    t.traceparent = header.traceparent
                layer_done = t.rows_in[header.layer] == t.spec.num_tokens
                if layer_view is not None:
                    t.on_layer(header.layer, layer_view)
            except ChunkError as e:
                self.fail(tid, e, even_if_complete=landed)
                raise
            except Exception as e:  # on_layer is the decode worker's code: its failure fails the transfer
                err = TransferError(tid, f"on_layer({header.layer}) raised {type(e).__name__}: {e}")
                self.fail(tid, err)
                raise err from e
            with self._lock:
                t.bytes += header.byte_length
                if layer_done:
                    t.layers_done += 1
                if t.complete and t.error is None:
                    t.finished_at = time.perf_counter()
                    t.done.set()
                return t.complete and t.error is None

    @staticmethod
    def _header_problem(t: _Transfer, h: KVChunkHeader, source: str, in_order: bool) -> ChunkError | None:
        """The first header field that does not fit transfer t, or None. in_order: the chunk must be
        its layer's next one (accept); without it only its rows must lie inside the layer (a landing
        site is handed out before the earlier chunks of its layer are accepted)."""
        spec, tid = t.spec, h.transfer_id
        if t.source is not None and source != t.source:
            return ChunkError(tid, "source", source, f"{t.source!r}, the sender of its first chunk")
        if h.dtype != spec.dtype_name:
            return ChunkError(tid, "dtype", h.dtype, repr(spec.dtype_name))
        if h.kv_dim != spec.kv_dim:
            return ChunkError(tid, "kv_dim", h.kv_dim, spec.kv_dim)
        if h.layer >= spec.num_layers:
            return ChunkError(tid, "layer", h.layer, f"< {spec.num_layers}")
        start = t.rows_in[h.layer] if in_order else h.token_offset
        if h.token_offset != start:
            return ChunkError(tid, "token_offset", h.token_offset, f"{start} (chunks in token order, once)")
        if not 0 < h.num_tokens <= spec.num_tokens - start:
            return ChunkError(tid, "num_tokens", h.num_tokens, f"1..{spec.num_tokens - start}")
        if h.byte_length != h.num_tokens * spec.row_bytes:
            return ChunkError(tid, "byte_length", h.byte_length, f"num_tokens * {spec.row_bytes}")
        return None

    def _check(
        self, t: _Transfer, h: KVChunkHeader, payload: Payload, source: str, landed: bool
    ) -> torch.Tensor | None:
        """Checks one chunk; returns the layer [num_tokens, kv_dim] to hand to on_layer when this
        chunk completes it (never for a landed chunk: its bytes already lie where they belong)."""
        spec, tid = t.spec, h.transfer_id
        problem = self._header_problem(t, h, source, in_order=True)
        if problem is not None:
            raise problem
        rows_in = t.rows_in[h.layer]
        size = payload.numel() if isinstance(payload, torch.Tensor) else memoryview(payload).nbytes
        if size != h.byte_length:
            raise ChunkError(tid, "payload size", size, f"byte_length {h.byte_length}")
        started = time.perf_counter()
        got = checksum(payload)
        t.verify_seconds += time.perf_counter() - started
        if h.checksum_kind != got.kind:
            raise ChunkError(tid, "checksum_kind", h.checksum_kind, f"{got.kind} ({KIND_NAMES[got.kind]})")
        if (h.checksum_lo, h.checksum_hi) != (got.lo, got.hi):
            expected = Checksum(h.checksum_kind, h.checksum_lo, h.checksum_hi)
            raise ChunkError(tid, "checksum", str(got), f"{expected} from the header")
        t.rows_in[h.layer] = rows_in + h.num_tokens
        if landed:
            return None
        whole = h.num_tokens == spec.num_tokens
        if whole and isinstance(payload, torch.Tensor):
            return payload.view(spec.dtype).view(spec.num_tokens, spec.kv_dim)
        if t.assembly is None:
            t.assembly = torch.empty(spec.layer_bytes, dtype=torch.uint8)
        start = rows_in * spec.row_bytes
        dst = t.assembly[start : start + h.byte_length]
        if isinstance(payload, torch.Tensor):
            dst.copy_(payload)
        else:
            dst.numpy()[:] = np.frombuffer(payload, dtype=np.uint8)
        if t.rows_in[h.layer] < spec.num_tokens:
            return None
        return t.assembly.view(spec.dtype).view(spec.num_tokens, spec.kv_dim)

    def fail(self, transfer_id: str, error: TransferError, even_if_complete: bool = False) -> None:
        """Fail a transfer that is not complete yet (first error wins); unknown ids are ignored.

        even_if_complete: also a complete one not waited on yet: a bad chunk that landed in place
        after the last good one (a duplicate) has overwritten verified bytes."""
        with self._lock:
            t = self._transfers.get(transfer_id)
            if t is None or t.error is not None or (t.done.is_set() and not even_if_complete):
                return
            t.error = error
            t.done.set()

    def fail_source(self, source: str, reason: str) -> None:
        """Fail every incomplete transfer whose chunks came from source (a lost connection)."""
        with self._lock:
            tids = [tid for tid, t in self._transfers.items() if t.source == source]
        for tid in tids:
            self.fail(tid, TransferError(tid, reason))

    def wait(self, transfer_id: str, timeout: float) -> TransferStats:
        with self._lock:
            t = self._transfers.get(transfer_id)
        if t is None:
            raise TransferError(transfer_id, "wait on a transfer that is not expected (or already waited on)")
        if not t.done.wait(timeout):
            layers = t.layers_done
            self.fail(
                transfer_id, TransferTimeout(transfer_id, timeout, f"{layers}/{t.spec.num_layers} layers")
            )
        self._settle(t)
        with t.busy, self._lock:  # no on_layer of this transfer runs after wait returns
            self._transfers.pop(transfer_id, None)
        if t.error is not None:
            raise t.error
        assert t.first_chunk_at is not None and t.finished_at is not None
        return TransferStats(
            bytes=t.bytes,
            seconds=t.finished_at - t.first_chunk_at,
            finished_at=t.finished_at,
            verify_seconds=t.verify_seconds,
            traceparent=t.traceparent,
            via_grpc=(t.source or "").startswith(GRPC_SOURCE_PREFIX),
        )

    def _settle(self, t: _Transfer) -> None:
        """Wait until no payload can still land in t's placed memory. t is done or failed, so no
        new landing site is handed out; one in flight ends when its bytes arrive or its connection
        breaks."""
        with self._settled:
            self._settled.wait_for(lambda: t.landing == 0)

    def cancel(self, transfer_id: str) -> bool:
        self.fail(transfer_id, TransferError(transfer_id, "cancelled by the receiver"))
        with self._lock:
            t = self._transfers.get(transfer_id)
        if t is not None:
            self._settle(t)
        with self._lock:
            t = self._transfers.pop(transfer_id, None)
        if t is not None:
            with t.busy:  # let an in-flight on_layer finish
                pass
        return t is not None

    def close(self, reason: str) -> None:
        """Fail every pending transfer and refuse new ones."""
        with self._lock:
            self._closed_reason = reason
            tids = list(self._transfers)
        for tid in tids:
            self.fail(tid, TransferError(tid, reason))
