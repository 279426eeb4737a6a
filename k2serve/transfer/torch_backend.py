"""KV transfer over torch.distributed point-to-point: gloo on CPU, NCCL for CUDA payloads.

Endpoint: "host:port" of the receiver's TCPStore (rendezvous and wire format: torch_wire).
Per layer the sender sends a control frame holding its KVChunkHeader and then the raw payload; the
receiver runs one thread per sender that receives into a reused buffer, validates, calls on_layer
and sends a verdict frame (KVPushAck) when a transfer completes or fails. No pickle anywhere.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import torch
import torch.distributed as dist

from k2serve.proto.kv_transfer_pb2 import KVControlFrame, KVPushAck
from k2serve.transfer import torch_wire as wire
from k2serve.transfer.base import (
    KVReceiver,
    OnLayer,
    TransferError,
    TransferSpec,
    TransferStats,
    TransferTimeout,
)
from k2serve.transfer.inbox import Inbox
from k2serve.transfer.outbox import SenderBase, split_layer

log = logging.getLogger(__name__)
_JOIN_S = 5.0  # how long shutdown waits for a thread to finish


class TorchKVSender(SenderBase):
    """Connected to one TorchKVReceiver; a send thread writes layers, an ack thread reads verdicts."""

    def __init__(
        self,
        endpoint: str,
        local_host: str | None = None,
        device: torch.device | str = "cpu",
        connect_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        host, port = wire.split_endpoint(endpoint)
        self.endpoint = endpoint
        self._device = torch.device(device)
        store = wire.store_client(host, port, connect_timeout)
        remote = store.get("device").decode()
        if remote != self._device.type:
            raise ValueError(
                f"receiver {endpoint} takes {remote} payloads, this sender sends {self._device.type}"
            )
        peer = store.add("joins", 1) - 1
        store.set(f"join/{peer}", b"sender")
        local_host = local_host or wire.local_address_towards(host, port)
        self._pg, self._payload_pg = wire.pair_groups(store, peer, 1, local_host, self._device)
        self._store = store
        self._verdicts: dict[str, Future[KVPushAck]] = {}
        self._broken: str | None = None  # why the connection is unusable
        self._goodbye_queued = False
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
        self._queue.put((spec, layer, kv, fut))
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
        while (item := self._queue.get()) is not None:
            spec, layer, kv, fut = item
            with self._lock:
                verdict = self._verdicts.get(spec.transfer_id)
                broken = self._broken
            if broken is not None or verdict is None or verdict.done():
                why = broken or "already rejected or abandoned"
                fut.set_exception(TransferError(spec.transfer_id, f"layer {layer} not sent: {why}"))
                continue
            try:
                for header, payload in split_layer(spec, layer, kv, wire.MAX_PAYLOAD_BYTES):
                    self._pg.send([wire.encode_frame(KVControlFrame(chunk=header))], 0, wire.DATA_TAG).wait()
                    self._payload_pg.send([payload], 0, wire.DATA_TAG).wait()
            except RuntimeError as e:  # gloo: connection to the receiver lost
                fut.set_exception(TransferError(spec.transfer_id, f"send failed: {e}"))
                self._fail_all(f"connection to receiver {self.endpoint} lost: {e}")
                return
            fut.set_result(None)
        try:
            self._pg.send([wire.encode_frame(KVControlFrame(goodbye=True))], 0, wire.DATA_TAG).wait()
        except RuntimeError as e:
            log.info("goodbye to %s not delivered: %s", self.endpoint, e)

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

    def shutdown(self) -> None:
        self._queue_goodbye()
        self._send_thread.join(_JOIN_S)
        self._ack_thread.join(_JOIN_S)  # ends when the receiver answers the goodbye
        self._fail_all("sender shut down")


class _Peer:
    """Receiver side of one sender connection; its thread owns the receives."""

    def __init__(self, owner: TorchKVReceiver, number: int) -> None:
        self.owner = owner
        self.number = number
        self.source = f"torch-peer-{number}"
        self.pg: dist.ProcessGroup | None = None
        self.payload_pg: dist.ProcessGroup | None = None
        self.send_lock = threading.Lock()  # verdicts and goodbye share the ACK tag
        self.goodbye_sent = False
        self.thread = threading.Thread(target=self.run, name=f"kv-recv-{number}", daemon=True)

    def run(self) -> None:
        o = self.owner
        try:
            store = wire.store_client(o.host, o.port, o.connect_timeout)
            pg, payload_pg = wire.pair_groups(store, self.number, 0, o.host, o.device)
        except RuntimeError as e:
            log.warning("sender %d never connected: %s", self.number, e)
            return
        with self.send_lock:
            self.pg, self.payload_pg = pg, payload_pg
        if o.stopping.is_set():
            self.say_goodbye()
        try:
            self.serve(pg, payload_pg)
        except (RuntimeError, wire.FrameError) as e:
            o.inbox.fail_source(self.source, f"connection to sender {self.number} lost: {e}")
            log.info("sender %d disconnected: %s", self.number, e)

    def serve(self, pg: dist.ProcessGroup, payload_pg: dist.ProcessGroup) -> None:
        frame_buf = torch.zeros(wire.FRAME_BYTES, dtype=torch.uint8)
        buf = torch.empty(0, dtype=torch.uint8, device=self.owner.device)
        while True:
            pg.recv([frame_buf], 1, wire.DATA_TAG).wait()
            frame = wire.decode_frame(frame_buf)
            if frame.WhichOneof("kind") == "goodbye":
                self.say_goodbye()
                return
            if frame.WhichOneof("kind") != "chunk":
                raise wire.FrameError(f"unexpected {frame.WhichOneof('kind')} frame", 0)
            header = frame.chunk
            n = header.byte_length
            if n > wire.MAX_PAYLOAD_BYTES:  # cannot skip a payload without receiving it: drop the peer
                raise wire.FrameError(f"payload of {n} bytes over {wire.MAX_PAYLOAD_BYTES}", n)
            if buf.numel() < n:
                buf = torch.empty(n, dtype=torch.uint8, device=self.owner.device)
            payload = buf[:n]
            if n:
                payload_pg.recv([payload], 1, wire.DATA_TAG).wait()
            try:
                complete = self.owner.inbox.accept(header, payload, self.source)
            except TransferError as e:
                self.verdict(KVPushAck(transfer_id=header.transfer_id, ok=False, error=str(e)[:300]))
                continue
            if complete:
                self.verdict(KVPushAck(transfer_id=header.transfer_id, ok=True))

    def verdict(self, ack: KVPushAck) -> None:
        with self.send_lock:
            if not self.goodbye_sent and self.pg is not None:
                self.pg.send([wire.encode_frame(KVControlFrame(ack=ack))], 1, wire.ACK_TAG).wait()

    def say_goodbye(self) -> None:
        with self.send_lock:
            if self.goodbye_sent or self.pg is None:
                return
            self.goodbye_sent = True
            try:
                self.pg.send([wire.encode_frame(KVControlFrame(goodbye=True))], 1, wire.ACK_TAG).wait()
            except RuntimeError as e:
                log.info("goodbye to sender %d not delivered: %s", self.number, e)


class TorchKVReceiver(KVReceiver):
    """Hosts the rendezvous TCPStore at host:port (0 picks a free port) and serves every sender."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        device: torch.device | str = "cpu",
        connect_timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.device = torch.device(device)
        self.connect_timeout = connect_timeout
        self.inbox = Inbox()
        self.stopping = threading.Event()
        self._store = dist.TCPStore(host, port, None, True, wire.IDLE_TIMEOUT, wait_for_workers=False)
        self.port = self._store.port
        self._store.set("device", self.device.type)
        self._peers: list[_Peer] = []
        self._peers_lock = threading.Lock()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="kv-accept", daemon=True)
        self._accept_thread.start()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def _accept_loop(self) -> None:
        waiter = dist.TCPStore(self.host, self.port, None, False, wire.IDLE_TIMEOUT)  # its own connection
        number = 0
        while True:
            key = f"join/{number}"
            waiter.wait([key])
            if waiter.get(key) == wire.STOP_VALUE:
                return
            peer = _Peer(self, number)
            with self._peers_lock:
                self._peers.append(peer)
            peer.thread.start()
            number += 1

    def expect(
        self,
        transfer_id: str,
        num_layers: int,
        num_tokens: int,
        kv_dim: int,
        dtype: torch.dtype,
        on_layer: OnLayer,
    ) -> None:
        self.inbox.expect(TransferSpec(transfer_id, num_layers, num_tokens, kv_dim, dtype), on_layer)

    def wait(self, transfer_id: str, timeout: float) -> TransferStats:
        return self.inbox.wait(transfer_id, timeout)

    def cancel(self, transfer_id: str) -> bool:
        return self.inbox.cancel(transfer_id)

    def shutdown(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.inbox.close("receiver shut down")
        stop = self._store.add("joins", 1) - 1
        self._store.set(f"join/{stop}", wire.STOP_VALUE)
        self._accept_thread.join(_JOIN_S)
        with self._peers_lock:
            peers = list(self._peers)
        for peer in peers:
            peer.say_goodbye()
        for peer in peers:
            peer.thread.join(_JOIN_S)  # ends when the sender answers the goodbye or is gone
