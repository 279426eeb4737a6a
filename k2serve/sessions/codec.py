"""Validation and byte encodings shared by every session store, so all of them agree exactly.

Encodings: token ids are packed as little-endian uint32 (4 bytes each, appendable with Redis
APPEND); block hashes as little-endian uint64 (8 bytes each); each message is one compact JSON
text; metadata is one JSON object of str -> str. Nothing is ever pickled.
"""

from __future__ import annotations

import array
import hashlib
import json
import re
import secrets
import struct
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from k2serve.kvcache.hashing import block_hash
from k2serve.sessions.errors import InvalidSessionArgument, InvalidSessionId, SessionLimitError

__all__ = [
    "SESSION_ID_PREFIX",
    "check_model",
    "check_session_id",
    "check_worker_id",
    "decode_json",
    "encode_messages",
    "encode_metadata",
    "extend_block_chain",
    "new_session_id",
    "owner_hash",
    "pack_hashes",
    "pack_tokens",
    "unpack_hashes",
    "unpack_tokens",
]

SESSION_ID_PREFIX = "sess_"
_ID_RANDOM_BYTES = 24  # 192 bits of entropy -> 32 URL-safe characters
_SESSION_ID_RE = re.compile(rf"{SESSION_ID_PREFIX}[A-Za-z0-9_-]{{32}}")
_WORKER_ID_RE = re.compile(r"[!-~]{1,256}")  # printable ASCII, no spaces
_MAX_MODEL_CHARS = 256
_UINT32 = "I"

assert array.array(_UINT32).itemsize == 4, "array('I') must be 32-bit on supported platforms"


def new_session_id() -> str:
    """A fresh, unguessable, URL-safe session id: "sess_" + 32 characters of token_urlsafe."""
    return SESSION_ID_PREFIX + secrets.token_urlsafe(_ID_RANDOM_BYTES)


def check_session_id(session_id: object) -> str:
    """Return `session_id` if it has the generated form, else raise InvalidSessionId."""
    if not isinstance(session_id, str) or not _SESSION_ID_RE.fullmatch(session_id):
        raise InvalidSessionId(session_id)
    return session_id


def owner_hash(owner_key: object) -> str:
    """Hex SHA-256 of an API key (non-empty str); the key itself is never stored."""
    if not isinstance(owner_key, str) or not owner_key:
        raise InvalidSessionArgument("owner_key", "<redacted>", "must be a non-empty str")
    return hashlib.sha256(owner_key.encode("utf-8", "surrogatepass")).hexdigest()


def check_model(model: object) -> str:
    if not isinstance(model, str) or not 0 < len(model) <= _MAX_MODEL_CHARS:
        raise InvalidSessionArgument("model", model, f"must be a str of 1..{_MAX_MODEL_CHARS} characters")
    try:
        model.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidSessionArgument("model", model, "must be encodable as UTF-8") from e
    return model


def check_worker_id(worker_id: object) -> str:
    if not isinstance(worker_id, str) or not _WORKER_ID_RE.fullmatch(worker_id):
        raise InvalidSessionArgument("worker_id", worker_id, "must be 1..256 printable ASCII characters")
    return worker_id


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids (ints in [0, 2**32)) as little-endian uint32 bytes."""
    if isinstance(token_ids, (str, bytes, bytearray)) or not isinstance(token_ids, Sequence):
        raise InvalidSessionArgument("new_token_ids", token_ids, "must be a sequence of ints")
    try:
        packed = array.array(_UINT32, token_ids)
    except (TypeError, OverflowError) as e:
        bad = next((t for t in token_ids if type(t) is not int or not 0 <= t < 1 << 32), token_ids)
        raise InvalidSessionArgument("new_token_ids", bad, "token ids must be ints in [0, 2**32)") from e
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def unpack_tokens(packed: bytes) -> list[int]:
    tokens = array.array(_UINT32)
    tokens.frombytes(packed)
    if sys.byteorder == "big":
        tokens.byteswap()
    return tokens.tolist()


def pack_hashes(hashes: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(hashes)}Q", *hashes)


def unpack_hashes(packed: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(packed) // 8}Q", packed)


def extend_block_chain(parent: int | None, tail: bytes, new: bytes, block_size: int) -> bytes:
    """Packed hashes of the blocks that appending `new` completes.

    parent: hash of the history's last full block (None if it has none); tail: the packed tokens
    after that block (fewer than block_size); new: the packed tokens being appended. Appending
    the result to the stored chain keeps it equal to `chain_hashes(all tokens, block_size)`.
    """
    tokens = unpack_tokens(tail + new)
    hashes: list[int] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_hash(parent, tokens[start : start + block_size])
        hashes.append(parent)
    return pack_hashes(hashes)


def encode_messages(messages: object) -> tuple[list[bytes], int]:
    """OpenAI-style messages (a sequence of JSON-serialisable mappings, each with a str "role")
    as compact UTF-8 JSON texts; returns (texts, number of messages with role "user")."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InvalidSessionArgument("new_messages", messages, "must be a sequence of message mappings")
    texts: list[bytes] = []
    user_turns = 0
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidSessionArgument(
                "new_messages", message, 'each message must be a mapping with a str "role"'
            )
        try:
            text = json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            texts.append(text.encode("utf-8"))
        except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
            raise InvalidSessionArgument("new_messages", message, f"not encodable as JSON: {e}") from e
        user_turns += message["role"] == "user"
    return texts, user_turns


def encode_metadata(metadata: object, max_bytes: int) -> bytes:
    """A str -> str mapping (None means empty) as JSON bytes with sorted keys."""
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidSessionArgument("metadata", metadata, "must be a mapping of str to str")
    try:
        encoded = json.dumps(dict(metadata), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        data = encoded.encode("utf-8")
    except ValueError as e:
        raise InvalidSessionArgument("metadata", metadata, f"not encodable as UTF-8: {e}") from e
    if len(data) > max_bytes:
        raise SessionLimitError("max_metadata_bytes", len(data), max_bytes)
    return data


def decode_json(data: bytes) -> Any:
    """Parse UTF-8 JSON bytes written by encode_messages / encode_metadata."""
    return json.loads(data.decode("utf-8"))
