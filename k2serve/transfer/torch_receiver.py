"""KV receiver of the torch.distributed backend (wire format and rendezvous: torch_wire).

It hosts the rendezvous TCPStore and, per connected sender, two threads: a network thread that
reads control frames from a ring of frame receives posted ahead of time and posts each chunk's
payload receive, and a delivery thread that waits for the payloads in order, validates each chunk
through the Inbox (on_layer, or in place), and sends verdict frames.

Where a payload lands: straight into the transfer's `place` destination when the receiver's
consumer gave one (the decode worker's paged pool when the request's blocks are consecutive), else
into one of two staging buffers per sender that the delivery thread hands to on_layer. Payload
receives are posted only once their frame is read (gloo then tells the sender to go; a receive is
posted while the previous payload still streams, so the wire never idles). No pickle anywhere.
"""

from __future__ import annotations

import hmac
import logging
import queue
import secrets
import threading
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from k2serve.engine.config import indexed_device
from k2serve.proto.kv_transfer_pb2 import KVChunkHeader, KVControlFrame, KVPushAck
from k2serve.transfer import torch_wire as wire
from k2serve.transfer.base import KVReceiver, OnLayer, Place, TransferError, TransferSpec, TransferStats
from k2serve.transfer.handshake import pair_key
from k2serve.transfer.inbox import Inbox

log = logging.getLogger(__name__)
_JOIN_S = 5.0  # how long shutdown waits for a thread to finish
_FRAMES = 4  # frame receives posted ahead per sender
_STAGING = 2  # staging buffers per sender: one being delivered while the next one fills


@dataclass
class _Arrival:
    """A chunk whose payload receive is posted: where it lands and how to return the buffer."""

    header: KVChunkHeader
    target: torch.Tensor  # flat uint8: a landing site in place, or a staging buffer's prefix
    work: dist.Work
    staging: torch.Tensor | None  # the staging buffer to return, None when landed in place


class _Peer:
    """Receiver side of one sender connection."""

    def __init__(self, owner: TorchKVReceiver, number: int) -> None:
        self.owner = owner
        self.number = number
        self.source = f"torch-peer-{number}"
        self.pg: dist.ProcessGroup | None = None
        self.payload_pg: dist.ProcessGroup | None = None  # held: the group lives as long as the peer
        self.send_lock = threading.Lock()  # verdicts and goodbye share the ACK tag
        self.goodbye_sent = False
        self.staging: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()  # free staging buffers
        self.staging_made = 0  # allocated on first need: transfers received in place use none
        self.arrivals: queue.SimpleQueue[_Arrival | None] = queue.SimpleQueue()  # in posting order
        self.thread = threading.Thread(target=self.run, name=f"kv-recv-{number}", daemon=True)
        self.deliver_thread = threading.Thread(target=self.deliver, name=f"kv-deliver-{number}", daemon=True)

    def run(self) -> None:
        o = self.owner
        try:
            store = wire.store_client(o.host, o.port, o.connect_timeout)
            published = (o.device.type, o.max_chunk_bytes)
            pg, payload_pg = wire.pair_groups(
                store, self.number, 0, o.host, o.device, o.key, published, o.connect_timeout
            )
        except (RuntimeError, ConnectionError) as e:  # ConnectionError: HandshakeError
            log.warning("sender %d never connected: %s", self.number, e)
            return
        self.payload_pg = payload_pg
        with self.send_lock:
            self.pg = pg
        if o.stopping.is_set():
            self.say_goodbye()
        self.deliver_thread.start()
        try:
            self.receive(pg, payload_pg)
        except (RuntimeError, wire.FrameError) as e:
            log.info("sender %d disconnected: %s", self.number, e)
            self.arrivals.put(None)
            self.deliver_thread.join(_JOIN_S)
            o.inbox.fail_source(self.source, f"connection to sender {self.number} lost: {e}")
            return
        self.arrivals.put(None)
        self.deliver_thread.join(_JOIN_S)
        self.say_goodbye()

    def receive(self, pg: dist.ProcessGroup, payload_pg: dist.ProcessGroup) -> None:
        """Network loop; returns at the sender's goodbye, raises when the connection breaks."""
        frames: deque[tuple[torch.Tensor, dist.Work]] = deque()
        for _ in range(_FRAMES):  # gloo matches receives of one tag from one peer in posting order
            buf = torch.zeros(wire.FRAME_BYTES, dtype=torch.uint8)
            frames.append((buf, pg.recv([buf], 1, wire.FRAME_TAG)))
        max_bytes, device = self.owner.max_chunk_bytes, self.owner.device
        while True:
            buf, work = frames.popleft()
            work.wait()
            frame = wire.decode_frame(buf)
            frames.append((buf, pg.recv([buf], 1, wire.FRAME_TAG)))  # decode_frame copied it out
            kind = frame.WhichOneof("kind")
            if kind == "goodbye":
                return
            if kind != "chunk":
                raise wire.FrameError(f"unexpected {kind} frame", 0)
            header = frame.chunk
            n = header.byte_length
            if not 0 < n <= max_bytes:  # the sender disagrees about the slot size: a broken peer
                raise wire.FrameError(f"payload of {n} bytes, not in 1..{max_bytes}", n)
            staging = None
            target = self.owner.inbox.landing_site(header, self.source, device)
            if target is None:
                staging = self.take_staging()
                target = staging[:n]
            try:
                work = payload_pg.recv([target], 1, wire.PAYLOAD_TAG)
            except RuntimeError:
                if staging is None:
                    self.owner.inbox.end_landing(header.transfer_id)
                raise
            self.arrivals.put(_Arrival(header, target, work, staging))

    def take_staging(self) -> torch.Tensor:
        """A free staging buffer; blocks while the delivery thread holds all _STAGING of them."""
        if self.staging.empty() and self.staging_made < _STAGING:
            self.staging_made += 1
            o = self.owner
            return torch.empty(o.max_chunk_bytes, dtype=torch.uint8, device=o.device)
        return self.staging.get()

    def deliver(self) -> None:
        """Delivery loop, in arrival order: wait for the payload, validate, verdict, free the buffer."""
        inbox = self.owner.inbox
        while (item := self.arrivals.get()) is not None:
            landed = item.staging is None
            try:
                item.work.wait()
            except RuntimeError as e:  # the connection broke; the network thread fails its transfers
                log.info("sender %d: payload of %s lost: %s", self.number, item.header.transfer_id, e)
                if landed:
                    inbox.end_landing(item.header.transfer_id)
                continue
            try:
                complete = inbox.accept(item.header, item.target, self.source, landed=landed)
                ack = KVPushAck(transfer_id=item.header.transfer_id, ok=True) if complete else None
            except TransferError as e:
                ack = KVPushAck(transfer_id=item.header.transfer_id, ok=False, error=str(e)[:300])
            if item.staging is not None:
                self.staging.put(item.staging)
            if ack is not None:
                self.verdict(ack)

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
    token: the cluster token every sender must prove it holds (handshake.py); None only with
    --insecure-internal (then any sender passes).
    connect_timeout: seconds a joining sender may take to build its process group and authenticate.
    max_chunk_bytes: the largest payload; each sender holds 2 staging buffers of this size (32 MiB
    at the default) for chunks not received in place, and layers larger than this arrive in
    several chunks (one extra copy on assembly when not received in place).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        device: torch.device | str = "cpu",
        connect_timeout: float = 30.0,
        max_chunk_bytes: int = wire.MAX_CHUNK_BYTES,
        token: str | None = None,
    ) -> None:
        if max_chunk_bytes <= 0:
            raise ValueError(f"max_chunk_bytes must be positive, got {max_chunk_bytes}")
        self.host = host
        self.max_chunk_bytes = max_chunk_bytes
        self.device = indexed_device(torch.device(device))
        self.connect_timeout = connect_timeout
        self.key = pair_key(token)
        self._stop_value = secrets.token_hex(16)  # the store's clients cannot stop the accept loop
        self.inbox = Inbox()
        self.stopping = threading.Event()
        self._store: dist.TCPStore | None
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
            if hmac.compare_digest(waiter.get(key), self._stop_value.encode()):
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
        place: Place | None = None,
    ) -> None:
        spec = TransferSpec(transfer_id, num_layers, num_tokens, kv_dim, dtype)
        self.inbox.expect(spec, on_layer, place)

    def wait(self, transfer_id: str, timeout: float) -> TransferStats:
        return self.inbox.wait(transfer_id, timeout)

    def cancel(self, transfer_id: str) -> bool:
        return self.inbox.cancel(transfer_id)

    def shutdown(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.inbox.close("receiver shut down")
        assert self._store is not None
        stop = self._store.add("joins", 1) - 1
        self._store.set(f"join/{stop}", self._stop_value)
        self._accept_thread.join(_JOIN_S)
        with self._peers_lock:
            peers = list(self._peers)
        for peer in peers:
            peer.say_goodbye()
        for peer in peers:
            peer.thread.join(_JOIN_S)  # ends when the sender answers the goodbye or is gone
        self._store = None  # the last reference to the TCPStore server: its port is free again
