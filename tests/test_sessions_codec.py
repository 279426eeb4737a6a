"""Session encodings and checks: ids, owner hashes, packed tokens, incremental block hashes, config."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from k2serve.kvcache.hashing import chain_hashes
from k2serve.sessions import InvalidSessionArgument, InvalidSessionId, SessionStoreConfig
from k2serve.sessions.codec import (
    check_session_id,
    encode_messages,
    extend_block_chain,
    new_session_id,
    owner_hash,
    pack_hashes,
    pack_tokens,
    unpack_hashes,
    unpack_tokens,
)

tokens = st.lists(st.integers(0, 2**32 - 1), max_size=60)


def test_session_ids_are_fresh_and_checked() -> None:
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(check_session_id(i) == i for i in ids)
    with pytest.raises(InvalidSessionId):
        check_session_id(next(iter(ids)) + "x")


def test_owner_hash_is_sha256_hex() -> None:
    assert owner_hash("sk-1") == hashlib.sha256(b"sk-1").hexdigest()
    with pytest.raises(InvalidSessionArgument) as e:
        owner_hash("")
    assert e.value.value == "<redacted>"


def test_tokens_pack_as_little_endian_uint32() -> None:
    assert pack_tokens([1, 2**32 - 1]) == b"\x01\x00\x00\x00\xff\xff\xff\xff"
    assert pack_hashes([1]) == b"\x01" + b"\x00" * 7


@given(tokens)
def test_pack_roundtrip(ids: list[int]) -> None:
    assert unpack_tokens(pack_tokens(ids)) == ids
    assert unpack_hashes(pack_hashes(ids)) == tuple(ids)


@given(tokens, st.lists(st.integers(0, 60), max_size=6), st.integers(1, 7))
def test_incremental_chain_equals_chain_hashes(ids: list[int], cuts: list[int], block_size: int) -> None:
    """Appending in any chunks, hashing only each chunk plus the partial tail, gives the full chain."""
    bounds = sorted({0, len(ids), *(c for c in cuts if c <= len(ids))})
    packed, chain = b"", b""
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        done = len(chain) // 8
        parent = unpack_hashes(chain[-8:])[0] if done else None
        tail = packed[done * block_size * 4 :]
        new = pack_tokens(ids[lo:hi])
        chain += extend_block_chain(parent, tail, new, block_size)
        packed += new
    assert unpack_hashes(chain) == tuple(chain_hashes(ids, block_size))


def test_messages_encode_compactly_and_count_user_turns() -> None:
    texts, users = encode_messages(
        [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": ""}]
    )
    assert texts == ['{"role":"user","content":"héllo"}'.encode(), b'{"role":"assistant","content":""}']
    assert users == 1


@pytest.mark.parametrize("field", ["block_size", "max_tokens", "max_ttl_s", "max_sessions_per_owner"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(InvalidSessionArgument) as e:
        SessionStoreConfig(**{field: value})  # type: ignore[arg-type]
    assert (e.value.name, e.value.value) == (field, value)


def test_config_default_ttl_within_max() -> None:
    with pytest.raises(InvalidSessionArgument):
        SessionStoreConfig(default_ttl_s=10, max_ttl_s=5)
