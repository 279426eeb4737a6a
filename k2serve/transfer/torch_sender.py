"""KV sender of the torch.distributed backend (wire format and rendezvous: torch_wire).

A send thread posts, per layer, a control frame holding its KVChunkHeader and then the raw payload,
keeping a few layers in flight; an ack thread reads the receiver's verdict frames (KVPushAck).
No pickle anywhere.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import torch
import torch.distributed as dist

from k2serve.engine.config import indexed_device
from k2serve.proto.kv_transfer_pb2 import KVControlFrame, KVPushAck
from k2serve.transfer import torch_wire as wire
from k2serve.transfer.base import TransferError, TransferSpec, TransferTimeout
from k2serve.transfer.handshake import pair_key
from k2serve.transfer.outbox import SenderBase, split_layer

log = logging.getLogger(__name__)
_JOIN_S = 5.0  # how long shutdown waits for a thread to finish
_IN_FLIGHT = (
    4  # layers posted to gloo and not yet confirmed sent (2 measured 0.66-0.67 of the socket, 4 0.67-0.75)
)


class TorchKVSender(SenderBase):
    """Connected to one TorchKVReceiver (endpoint "host:port" of its TCPStore).

    local_host: the address gloo binds here (default: the interface that routes to the receiver).
    device: where the sent tensors live; must match the receiver's ("cuda" sends over NCCL).
    token: the cluster token, proved to the receiver and required of it (handshake.py), so no KV
    goes to a receiver without it; None only with --insecure-internal.
    connect_timeout: seconds to reach the store, build the process groups and authenticate.
    Raises HandshakeError (a ConnectionError) when the receiver fails the handshake.
    """

    def __init__(
        self,
        endpoint: str,
        local_host: str | None = None,
        device: torch.device | str = "cpu",
        connect_timeout: float = 30.0,
        token: str | None = None,
    ) -> None:
        super().__init__()
        host, port = wire.split_endpoint(endpoint)
        self.endpoint = endpoint
        self._device = indexed_device(torch.device(device))
        self.payload_device = self._device
        store = wire.store_client(host, port, connect_timeout)
        remote = store.get("device").decode()
        if remote != self._device.type:
            raise ValueError(
                f"receiver {endpoint} takes {remote} payloads, this sender sends {self._device.type}"
            )
        self._max_chunk_bytes = int(store.get("max_chunk_bytes"))
        peer = store.add("joins", 1) - 1
        store.set(f"join/{peer}", "sender")
        local_host = local_host or wire.local_address_towards(host, port)
        published = (remote, self._max_chunk_bytes)  # the handshake proves them the receiver's
        self._pg, self._payload_pg = wire.pair_groups(
            store, peer, 1, local_host, self._device, pair_key(token), published, connect_timeout
        )
        self._store = store
        self._verdicts: dict[str, Future[KVPushAck]] = {}
        self._broken: str | None = None  # why the connection is unusable
        self._goodbye_queued = False
        self._send_thread_done = False  # set with _lock held, so _send never queues behind it
        self._queue: queue.SimpleQueue[tuple[TransferSpec, int, torch.Tensor, Future[None]] | None]
        self._queue = queue.SimpleQueue()
        self._send_thread = threading.Thread(target=self._send_loop, name=f"kv-send-{peer}", daemon=True)
        self._ack_thread = threading.Thread(target=self._ack_loop, name=f"kv-ack-{peer}", daemon=True)
        self._send_thread.start()
        self._ack_thread.start()

    def _start(self, spec: TransferSpec) -> None:
        with self._lock:
            if self._broken is not None:
                raise TransferError(spec.transfer_id, self._broken)
            self._verdicts[spec.transfer_id] = Future()

    def _send(self, spec: TransferSpec, layer: int, kv: torch.Tensor) -> Future[None]:
        fut: Future[None] = Future()
        with self._lock:
            if not self._send_thread_done:
                self._queue.put((spec, layer, kv, fut))
                return fut
            why = self._broken or "sender shut down"
        fut.set_exception(TransferError(spec.transfer_id, f"layer {layer} not sent: {why}"))
        return fut

    def _finish(self, spec: TransferSpec, timeout: float, complete: bool) -> None:
        with self._lock:
            verdict = self._verdicts[spec.transfer_id]
        try:
            if not complete:
                return  # the receiver drops it at its own timeout
            ack = verdict.result(timeout=timeout)
        except FutureTimeout:
            raise TransferTimeout(spec.transfer_id, timeout, "no verdict from the receiver") from None
        finally:
            with self._lock:
                del self._verdicts[spec.transfer_id]  # layers still queued are dropped by the send thread
        if not ack.ok:
            raise TransferError(spec.transfer_id, f"receiver rejected it: {ack.error}")

    def _send_loop(self) -> None:
        try:
            self._send_layers()
        finally:
            with self._lock:
                self._send_thread_done = True
                why = self._broken or "sender shut down"
            while True:  # layers queued behind the goodbye or a broken connection
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[3].set_exception(
                        TransferError(item[0].transfer_id, f"layer {item[1]} not sent: {why}")
                    )

    def _send_layers(self) -> None:
        """Posts each layer's frame and payload without waiting, keeping up to _IN_FLIGHT layers
        on the wire, so the next layer's checksum overlaps the current layer's transfer."""
        in_flight: deque[tuple[list[dist.Work], Future[None], str]] = deque()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if not self._drain(in_flight, 0):
                    return
                item = self._queue.get()
            if item is None:
                break
            spec, layer, kv, fut = item
            with self._lock:
                verdict = self._verdicts.get(spec.transfer_id)
                broken = self._broken
            if broken is not None or verdict is None or verdict.done():
                why = broken or "already rejected or abandoned"
                fut.set_exception(TransferError(spec.transfer_id, f"layer {layer} not sent: {why}"))
                continue
            works: list[dist.Work] = []
            try:
                for header, payload in split_layer(spec, layer, kv, self._max_chunk_bytes):
                    frame = wire.encode_frame(KVControlFrame(chunk=header))
                    works.append(self._pg.send([frame], 0, wire.FRAME_TAG))
                    works.append(self._payload_pg.send([payload], 0, wire.PAYLOAD_TAG))
            except RuntimeError as e:
                fut.set_exception(TransferError(spec.transfer_id, f"send failed: {e}"))
                self._fail_all(f"connection to receiver {self.endpoint} lost: {e}")
                return
            in_flight.append((works, fut, spec.transfer_id))
            if not self._drain(in_flight, _IN_FLIGHT):
                return
        if self._drain(in_flight, 0):
            try:
                self._pg.send([wire.encode_frame(KVControlFrame(goodbye=True))], 0, wire.FRAME_TAG).wait()
            except RuntimeError as e:
                log.info("goodbye to %s not delivered: %s", self.endpoint, e)

    def _drain(self, in_flight: deque[tuple[list[dist.Work], Future[None], str]], keep: int) -> bool:
        """Wait for the oldest layers until at most `keep` are in flight; False when the connection failed."""
        while len(in_flight) > keep:
            works, fut, tid = in_flight.popleft()
            try:
                for work in works:
                    work.wait()
            except RuntimeError as e:  # gloo: connection to the receiver lost
                fut.set_exception(TransferError(tid, f"send failed: {e}"))
                for _, later, later_tid in in_flight:
                    later.set_exception(TransferError(later_tid, f"send failed: {e}"))
                self._fail_all(f"connection to receiver {self.endpoint} lost: {e}")
                return False
            fut.set_result(None)
        return True

    def _ack_loop(self) -> None:
        buf = torch.zeros(wire.FRAME_BYTES, dtype=torch.uint8)
        while True:
            try:
                self._pg.recv([buf], 0, wire.ACK_TAG).wait()
                frame = wire.decode_frame(buf)
            except (RuntimeError, wire.FrameError) as e:
                self._fail_all(f"connection to receiver {self.endpoint} lost: {e}")
                self._queue_goodbye()
                return
            if frame.WhichOneof("kind") == "goodbye":
                self._fail_all(f"receiver {self.endpoint} shut down")
                self._queue_goodbye()
                return
            with self._lock:
                verdict = self._verdicts.get(frame.ack.transfer_id)
            if verdict is not None and not verdict.done():
                verdict.set_result(frame.ack)

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            if self._broken is None:
                self._broken = reason
            pending = [(tid, f) for tid, f in self._verdicts.items() if not f.done()]
        for tid, f in pending:
            f.set_result(KVPushAck(transfer_id=tid, ok=False, error=reason))

    def _queue_goodbye(self) -> None:
        with self._lock:
            if self._goodbye_queued:
                return
            self._goodbye_queued = True
        self._queue.put(None)

    @property
    def broken(self) -> str | None:
        with self._lock:
            if self._broken is None and self._send_thread_done:
                return "sender shut down"
            return self._broken

    def shutdown(self) -> None:
        self._queue_goodbye()
        self._send_thread.join(_JOIN_S)
        self._ack_thread.join(_JOIN_S)  # ends when the receiver answers the goodbye
        self._fail_all("sender shut down")
