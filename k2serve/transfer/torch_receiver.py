"""KV receiver of the torch.distributed backend (wire format and rendezvous: torch_wire).

It hosts the rendezvous TCPStore and, per connected sender, two threads: a network thread that
takes chunks from a ring of receive slots posted ahead of time, and a delivery thread that
validates each chunk through the Inbox, calls on_layer, sends verdict frames and re-posts the
slot. No pickle anywhere.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from k2serve.proto.kv_transfer_pb2 import KVChunkHeader, KVControlFrame, KVPushAck
from k2serve.transfer import torch_wire as wire
from k2serve.transfer.base import KVReceiver, OnLayer, TransferError, TransferSpec, TransferStats
from k2serve.transfer.inbox import Inbox

log = logging.getLogger(__name__)
_JOIN_S = 5.0  # how long shutdown waits for a thread to finish
_RING = 2  # receive slots per sender: one being validated while the next one fills


@dataclass
class _Slot:
    """A frame buffer and a full-size payload buffer with their posted receives.

    gloo lets a payload land in the larger posted buffer, so both receives are posted ahead. NCCL
    (CUDA payloads; untested here) needs the exact size: its receive is posted once the frame is read.
    """

    frame: torch.Tensor
    payload: torch.Tensor
    frame_work: dist.Work | None = None
    payload_work: dist.Work | None = None

    def post(self, pg: dist.ProcessGroup, payload_pg: dist.ProcessGroup) -> None:
        self.frame_work = pg.recv([self.frame], 1, wire.FRAME_TAG)
        if self.payload.device.type == "cpu":
            self.payload_work = payload_pg.recv([self.payload], 1, wire.PAYLOAD_TAG)

    def wait_payload(self, payload_pg: dist.ProcessGroup, n: int) -> None:
        if self.payload.device.type != "cpu":
            self.payload_work = payload_pg.recv([self.payload[:n]], 1, wire.PAYLOAD_TAG)
        assert self.payload_work is not None
        self.payload_work.wait()


class _Peer:
    """Receiver side of one sender connection."""

    def __init__(self, owner: TorchKVReceiver, number: int) -> None:
        self.owner = owner
        self.number = number
        self.source = f"torch-peer-{number}"
        self.pg: dist.ProcessGroup | None = None
        self.payload_pg: dist.ProcessGroup | None = None
        self.send_lock = threading.Lock()  # verdicts and goodbye share the ACK tag
        self.goodbye_sent = False
        self.free: queue.SimpleQueue[_Slot | None] = queue.SimpleQueue()  # posted slots in posting order
        self.ready: queue.SimpleQueue[tuple[KVChunkHeader, _Slot] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, name=f"kv-recv-{number}", daemon=True)
        self.deliver_thread = threading.Thread(target=self.deliver, name=f"kv-deliver-{number}", daemon=True)

    def run(self) -> None:
        o = self.owner
        try:
            store = wire.store_client(o.host, o.port, o.connect_timeout)
            pg, payload_pg = wire.pair_groups(store, self.number, 0, o.host, o.device)
        except RuntimeError as e:
            log.warning("sender %d never connected: %s", self.number, e)
            return
        self.payload_pg = payload_pg
        with self.send_lock:
            self.pg = pg
        if o.stopping.is_set():
            self.say_goodbye()
        for _ in range(_RING):
            slot = _Slot(
                torch.zeros(wire.FRAME_BYTES, dtype=torch.uint8),
                torch.empty(o.max_chunk_bytes, dtype=torch.uint8, device=o.device),
            )
            slot.post(pg, payload_pg)
            self.free.put(slot)
        self.deliver_thread.start()
        try:
            self.receive()
        except (RuntimeError, wire.FrameError) as e:
            log.info("sender %d disconnected: %s", self.number, e)
            self.ready.put(None)
            self.deliver_thread.join(_JOIN_S)
            o.inbox.fail_source(self.source, f"connection to sender {self.number} lost: {e}")
            return
        self.ready.put(None)
        self.deliver_thread.join(_JOIN_S)
        self.say_goodbye()

    def receive(self) -> None:
        """Network loop; returns at the sender's goodbye, raises when the connection breaks."""
        while True:
            slot = self.free.get()
            if slot is None:
                raise RuntimeError("the delivery thread could not re-post a receive")
            assert slot.frame_work is not None and self.payload_pg is not None
            slot.frame_work.wait()
            frame = wire.decode_frame(slot.frame)
            kind = frame.WhichOneof("kind")
            if kind == "goodbye":
                return
            if kind != "chunk":
                raise wire.FrameError(f"unexpected {kind} frame", 0)
            n = frame.chunk.byte_length
            if not 0 < n <= self.owner.max_chunk_bytes:  # its payload would not match its slot
                raise wire.FrameError(f"payload of {n} bytes, not in 1..{self.owner.max_chunk_bytes}", n)
            slot.wait_payload(self.payload_pg, n)
            self.ready.put((frame.chunk, slot))

    def deliver(self) -> None:
        """Delivery loop: validate, on_layer, verdict, re-post the slot (in arrival order)."""
        while (item := self.ready.get()) is not None:
            header, slot = item
            try:
                complete = self.owner.inbox.accept(header, slot.payload[: header.byte_length], self.source)
                ack = KVPushAck(transfer_id=header.transfer_id, ok=True) if complete else None
            except TransferError as e:
                ack = KVPushAck(transfer_id=header.transfer_id, ok=False, error=str(e)[:300])
            if ack is not None:
                self.verdict(ack)
            try:
                assert self.pg is not None and self.payload_pg is not None
                slot.post(self.pg, self.payload_pg)
            except RuntimeError as e:
                log.info("sender %d: re-posting a receive failed: %s", self.number, e)
                self.free.put(None)
                return
            self.free.put(slot)

    def verdict(self, ack: KVPushAck) -> None:
        with self.send_lock:
            if self.goodbye_sent or self.pg is None:
                return
            try:
                self.pg.send([wire.encode_frame(KVControlFrame(ack=ack))], 1, wire.ACK_TAG).wait()
            except RuntimeError as e:  # the network thread sees the broken connection too
                log.info("verdict to sender %d not delivered: %s", self.number, e)

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
    """Hosts the rendezvous TCPStore at host:port (0 picks a free port) and serves every sender.

    device: where payloads land and on_layer tensors live ("cuda" receives over NCCL).
    connect_timeout: seconds a joining sender may take to build its process group.
    max_chunk_bytes: payload slot size; each sender holds 2 slots (32 MiB at the default), and
    layers larger than this arrive in several chunks (one extra copy on assembly).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        device: torch.device | str = "cpu",
        connect_timeout: float = 30.0,
        max_chunk_bytes: int = wire.MAX_CHUNK_BYTES,
    ) -> None:
        if max_chunk_bytes <= 0:
            raise ValueError(f"max_chunk_bytes must be positive, got {max_chunk_bytes}")
        self.host = host
        self.max_chunk_bytes = max_chunk_bytes
        self.device = torch.device(device)
        self.connect_timeout = connect_timeout
        self.inbox = Inbox()
        self.stopping = threading.Event()
        self._store = dist.TCPStore(host, port, None, True, wire.IDLE_TIMEOUT, wait_for_workers=False)
        self.port = self._store.port
        self._store.set("device", self.device.type)
        self._store.set("max_chunk_bytes", str(max_chunk_bytes))
        self._peers: list[_Peer] = []
        self._peers_lock = threading.Lock()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="kv-accept", daemon=True)
        self._accept_thread.start()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def _accept_loop(self) -> None:
        waiter = wire.store_client(self.host, self.port, wire.IDLE_TIMEOUT.total_seconds())  # own connection
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
