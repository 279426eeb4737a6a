"""KVChunk wire codec that skips protobuf's copies of the payload (the gRPC backend's hot path).

The bytes are exactly a serialized KVChunk {1: header, 2: payload}, so peers using the generated
KVTransferStub / KVChunk classes interoperate. Encoding copies the payload once (into the message
bytes); decoding returns the payload as a memoryview into the received bytes, without a copy.
Only the small header goes through the protobuf parser; nothing is ever unpickled or executed.
"""

from __future__ import annotations

import torch
from google.protobuf.message import DecodeError

from k2serve.proto.kv_transfer_pb2 import KVChunkHeader

_HEADER_TAG = b"\x0a"  # field 1, wire type 2 (length-delimited)
_PAYLOAD_TAG = b"\x12"  # field 2, wire type 2


class ChunkDecodeError(ValueError):
    """The bytes are not a KVChunk this codec accepts; carries the byte offset of the problem."""

    def __init__(self, reason: str, offset: int) -> None:
        super().__init__(f"malformed KVChunk at byte {offset}: {reason}")
        self.offset = offset


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ChunkDecodeError("truncated or overlong varint", pos)


def encode_chunk(chunk: tuple[KVChunkHeader, torch.Tensor]) -> bytes:
    """Serialize (header, flat uint8 CPU payload) as KVChunk bytes."""
    header, payload = chunk
    head = header.SerializeToString()
    body = payload.numpy().data
    return b"".join((_HEADER_TAG, _varint(len(head)), head, _PAYLOAD_TAG, _varint(body.nbytes), body))


def decode_chunk(data: bytes) -> tuple[KVChunkHeader, memoryview]:
    """Parse KVChunk bytes into (header, payload view); fields in any order, unknown fields skipped.

    Raises ChunkDecodeError on malformed input or a repeated header / payload field.
    """
    view = memoryview(data)
    header: KVChunkHeader | None = None
    payload: memoryview | None = None
    pos = 0
    while pos < len(view):
        key, pos = _read_varint(view, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 2:
            length, pos = _read_varint(view, pos)
            if pos + length > len(view):
                raise ChunkDecodeError(f"field {field} of {length} bytes runs past the end", pos)
            value, pos = view[pos : pos + length], pos + length
            if field == 1:
                if header is not None:
                    raise ChunkDecodeError("repeated header", pos)
                try:
                    header = KVChunkHeader.FromString(value.tobytes())
                except DecodeError as e:
                    raise ChunkDecodeError(f"undecodable header: {e}", pos) from e
            elif field == 2:
                if payload is not None:
                    raise ChunkDecodeError("repeated payload", pos)
                payload = value
        elif wire_type == 0:
            _, pos = _read_varint(view, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise ChunkDecodeError(f"unsupported wire type {wire_type}", pos)
    if pos != len(view):
        raise ChunkDecodeError("truncated fixed-width field", len(view))
    return header or KVChunkHeader(), payload if payload is not None else memoryview(b"")
