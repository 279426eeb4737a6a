"""Sender-side bookkeeping shared by every backend: argument checks, chunking and the close rules.

Backends subclass SenderBase and implement `_start`, `_send`, `_finish` and `shutdown`; the public
KVSender methods here validate arguments and track which layers were sent.
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from k2serve.proto.kv_transfer_pb2 import KVChunkHeader
from k2serve.transfer.base import (
    KVSender,
    TransferError,
    TransferSpec,
    TransferStats,
    as_bytes_view,
)
from k2serve.transfer.checksum import checksum


@dataclass
class Outgoing:
    """One open transfer on the sender side."""

    spec: TransferSpec
    opened_at: float = field(default_factory=time.perf_counter)
    layers_sent: set[int] = field(default_factory=set)
    bytes: int = 0


def split_layer(
    spec: TransferSpec, layer: int, kv: torch.Tensor, max_chunk_bytes: int
) -> Iterator[tuple[KVChunkHeader, torch.Tensor]]:
    """Cut one layer into (header, flat uint8 payload) chunks of at most max_chunk_bytes, in token order.

    Payloads are views of kv's memory when kv is contiguous; checksums are computed here.
    """
    flat = as_bytes_view(kv)
    rows = max(1, max_chunk_bytes // spec.row_bytes)
    for offset in range(0, spec.num_tokens, rows):
        n = min(rows, spec.num_tokens - offset)
        payload = flat[offset * spec.row_bytes : (offset + n) * spec.row_bytes]
        header = KVChunkHeader(
            transfer_id=spec.transfer_id,
            layer=layer,
            token_offset=offset,
            num_tokens=n,
            kv_dim=spec.kv_dim,
            dtype=spec.dtype_name,
            byte_length=payload.numel(),
        )
        header.checksum_kind, header.checksum_lo, header.checksum_hi = checksum(payload)
        if spec.traceparent:
            header.traceparent = spec.traceparent
        yield header, payload


class SenderBase(KVSender):
    """KVSender with the argument checks and layer tracking; backends provide the wire."""

    payload_device = torch.device("cpu")
    """Where this backend's payloads must live; send_layer copies a layer from elsewhere there."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, Outgoing] = {}

    @abstractmethod
    def _start(self, spec: TransferSpec) -> None:
        """Backend: prepare to send this transfer (e.g. open a stream)."""

    @abstractmethod
    def _send(self, spec: TransferSpec, layer: int, kv: torch.Tensor) -> Future[None]:
        """Backend: queue one validated layer."""

    @abstractmethod
    def _finish(self, spec: TransferSpec, timeout: float, complete: bool) -> None:
        """Backend: end the transfer and wait for the receiver's verdict; raise TransferError on failure.

        complete is False when some layer was never sent: abandon the transfer (close raises anyway).
        """

    def open(
        self,
        transfer_id: str,
        num_layers: int,
        num_tokens: int,
        kv_dim: int,
        dtype: torch.dtype,
        traceparent: str = "",
    ) -> None:
        spec = TransferSpec(transfer_id, num_layers, num_tokens, kv_dim, dtype, traceparent)
        with self._lock:
            if transfer_id in self._open:
                raise ValueError(f"transfer_id {transfer_id!r} is already open")
            self._open[transfer_id] = Outgoing(spec)
        try:
            self._start(spec)
        except BaseException:
            with self._lock:
                self._open.pop(transfer_id, None)
            raise

    def send_layer(self, transfer_id: str, layer: int, kv: torch.Tensor) -> Future[None]:
        with self._lock:
            out = self._open.get(transfer_id)
            if out is None:
                raise ValueError(f"transfer_id {transfer_id!r} is not open")
            spec = out.spec
            if not 0 <= layer < spec.num_layers:
                raise ValueError(f"layer {layer} out of range [0, {spec.num_layers})")
            if layer in out.layers_sent:
                raise ValueError(f"layer {layer} of {transfer_id!r} was already sent")
            if tuple(kv.shape) != (spec.num_tokens, spec.kv_dim) or kv.dtype != spec.dtype:
                raise ValueError(
                    f"kv is {tuple(kv.shape)} {kv.dtype}, expected ({spec.num_tokens}, {spec.kv_dim}) {spec.dtype}"
                )
            out.layers_sent.add(layer)
            out.bytes += spec.layer_bytes
        if kv.device != self.payload_device:  # e.g. a GPU prefill worker sending over gloo or gRPC
            kv = kv.to(self.payload_device)
        return self._send(spec, layer, kv)

    def close(self, transfer_id: str, timeout: float) -> TransferStats:
        with self._lock:
            out = self._open.pop(transfer_id, None)
        if out is None:
            raise ValueError(f"transfer_id {transfer_id!r} is not open")
        missing = out.spec.num_layers - len(out.layers_sent)
        self._finish(out.spec, timeout, complete=missing == 0)
        if missing:
            raise TransferError(
                transfer_id, f"closed with {missing} of {out.spec.num_layers} layers never sent"
            )
        return TransferStats(bytes=out.bytes, seconds=time.perf_counter() - out.opened_at)
