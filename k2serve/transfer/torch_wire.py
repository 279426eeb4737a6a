"""Wire pieces of the torch.distributed backend: control frames, pair process groups, rendezvous keys.

Rendezvous (one TCPStore per receiver, shared by all its senders):
- The receiver hosts a TCPStore master at its endpoint "host:port" and sets key "device" to its
  payload device type ("cpu" | "cuda").
- A sender connects as a store client, takes a peer number n = add("joins", 1) - 1 and sets
  "join/<n>". The receiver's accept thread waits for "join/0", "join/1", ... in order (the
  receiver's stop value, a secret it draws at start, ends it at shutdown).
- The store is open to any client (handshake.py): nothing read from it is trusted until the pair's
  handshake, which covers the published values, has passed on each connection.
- Both sides then build two 2-rank groups, receiver rank 0, sender rank 1 (gloo exchanges their
  addresses through the store), each authenticated with the cluster token before use
  (handshake.py): a control group over PrefixStore("peer/<n>/", store) for frames
  and verdicts, and a payload group: gloo over PrefixStore("peer/<n>/payload/", store) for host
  payloads, NCCL over PrefixStore("peer/<n>/nccl/", store) for CUDA payloads. Two connections,
  because one gloo connection writes messages in order: a frame posted while a 4.7 MB payload is
  on the wire would arrive only after it, and the receiver could not post the next payload's
  receive before the previous one ended (an idle round trip per chunk).

Messages: per chunk, a control frame on FRAME_TAG then its payload on PAYLOAD_TAG. A frame is a
fixed FRAME_BYTES uint8 tensor = u32 little-endian body length + a KVControlFrame protobuf + zero
padding. A payload is 1..max_chunk_bytes raw bytes, where max_chunk_bytes is what the receiver
published under store key "max_chunk_bytes". The receiver keeps several frame receives posted
ahead (gloo lets a frame land in its fixed-size buffer at once, and matches receives of one tag
from one peer in posting order) and posts each payload's receive, of exactly byte_length bytes,
once its frame is read, into the memory the chunk belongs in (so gloo sends a payload only when
the receiver is ready for it). Verdicts travel back on ACK_TAG as frames.
"""

from __future__ import annotations

import socket
import struct
from datetime import timedelta

import torch
import torch.distributed as dist

from k2serve.proto.kv_transfer_pb2 import KVControlFrame
from k2serve.transfer.handshake import authenticate

FRAME_TAG = 1  # sender -> receiver: chunk or goodbye frames
PAYLOAD_TAG = 3  # sender -> receiver: the payload of the preceding chunk frame
ACK_TAG = 2  # receiver -> sender: verdict or goodbye frames
FRAME_BYTES = 512
MAX_CHUNK_BYTES = 16 << 20  # default largest payload; a 4,096-token K2 layer (4.7 MB) fits in one
IDLE_TIMEOUT = timedelta(days=365)
"""Timeout of the pair groups' operations: a gloo timeout closes the pair, and a receiver may wait
for its next header for a long time, so waits end by a goodbye frame or a closed socket instead."""

_LEN = struct.Struct("<I")


class FrameError(ValueError):
    """A control frame could not be decoded; carries the declared body length."""

    def __init__(self, reason: str, length: int) -> None:
        super().__init__(f"bad control frame ({reason}, body length {length})")
        self.length = length


def encode_frame(frame: KVControlFrame) -> torch.Tensor:
    """frame as a FRAME_BYTES uint8 tensor; raises FrameError when it does not fit."""
    body = frame.SerializeToString()
    if len(body) > FRAME_BYTES - _LEN.size:
        raise FrameError("too long", len(body))
    buf = bytearray(FRAME_BYTES)
    _LEN.pack_into(buf, 0, len(body))
    buf[_LEN.size : _LEN.size + len(body)] = body
    return torch.frombuffer(buf, dtype=torch.uint8)


def decode_frame(buf: torch.Tensor) -> KVControlFrame:
    """Parse a received FRAME_BYTES uint8 tensor; raises FrameError on a bad length or body."""
    raw = buf.numpy().tobytes()
    (length,) = _LEN.unpack_from(raw, 0)
    if length > FRAME_BYTES - _LEN.size:
        raise FrameError("length out of range", length)
    frame = KVControlFrame()
    try:
        frame.ParseFromString(raw[_LEN.size : _LEN.size + length])
    except Exception as e:  # protobuf's DecodeError; parsing never executes code
        raise FrameError(f"undecodable: {e}", length) from e
    if frame.WhichOneof("kind") is None:
        raise FrameError("empty", length)
    return frame


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """ "host:port" -> (host, port); raises ValueError when malformed."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint {endpoint!r} is not 'host:port'")
    return host.strip("[]"), int(port)


def local_address_towards(host: str, port: int) -> str:
    """The local IP address the OS would use to reach host:port (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


def store_client(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, None, False, timedelta(seconds=timeout_s))


def pair_groups(
    store: dist.Store,
    peer: int,
    rank: int,
    local_host: str,
    device: torch.device,
    key: bytes,
    published: tuple[str, int],
    timeout_s: float,
) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(control group, payload group) of peer connection `peer`, each authenticated (handshake.py)
    before it is returned; blocks until the other rank joins, raises HandshakeError when it fails
    the handshake. published: the receiver's (payload device type, max_chunk_bytes) as this rank
    knows them (the receiver's own, or what the sender read from the store): both proofs cover them.

    The control group is gloo on local_host's interface; the payload group is a second gloo group
    (its own TCP connection) on CPU and an NCCL group when device is CUDA (one device per rank, as
    NCCL requires). The payload group is built only once the control connection is authenticated.
    """
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # public at run time, not in torch's stubs
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
    opts._timeout = IDLE_TIMEOUT
    device_type, max_chunk_bytes = published
    cpu = torch.device("cpu")

    def check(pg: dist.ProcessGroup, label: str, on: torch.device) -> None:
        authenticate(pg, rank, key, label, peer, device_type, max_chunk_bytes, on, timeout_s)

    control = dist.ProcessGroupGloo(dist.PrefixStore(f"peer/{peer}/", store), rank, 2, opts)
    check(control, "control", cpu)  # type: ignore[arg-type]  # backends serve as groups; torch's stubs disagree
    if device.type != "cuda":
        payload = dist.ProcessGroupGloo(dist.PrefixStore(f"peer/{peer}/payload/", store), rank, 2, opts)
        check(payload, "payload", cpu)  # type: ignore[arg-type]  # as above
        return control, payload  # type: ignore[return-value]  # as above
    torch.cuda.set_device(device)
    nccl = dist.ProcessGroupNCCL(dist.PrefixStore(f"peer/{peer}/nccl/", store), rank, 2)  # type: ignore[call-arg]  # options default at run time
    check(nccl, "payload", device)  # type: ignore[arg-type]  # as above
    return control, nccl  # type: ignore[return-value]  # as above
