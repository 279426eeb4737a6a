"""RedisSessionStore specifics: key layout and TTLs, no API key at rest, AOF restarts, failures."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from k2serve.cluster.redis_server import EmbeddedRedis
from k2serve.sessions import (
    RedisSessionStore,
    SessionHolder,
    SessionStoreConfig,
    SessionStoreUnavailable,
)

KEY = "sk-live-0123456789abcdef"
CONFIG = SessionStoreConfig(block_size=4)


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as srv:  # appendonly yes, appendfsync everysec
        yield srv


@pytest.fixture
def client(server: EmbeddedRedis) -> Iterator[redis.Redis]:
    c = server.client()
    c.flushall()
    yield c
    c.close()


@pytest.fixture
def store(server: EmbeddedRedis, client: redis.Redis) -> Iterator[RedisSessionStore]:
    s = RedisSessionStore(server.url, CONFIG)
    yield s
    s.close()


def dump(client: redis.Redis) -> dict[bytes, Any]:
    """Every key with its value, whatever its type."""
    read = {b"hash": client.hgetall, b"string": client.get, b"list": lambda k: client.lrange(k, 0, -1)}
    read |= {b"zset": lambda k: client.zrange(k, 0, -1), b"set": client.smembers}
    return {k: read[client.type(k)](k) for k in client.scan_iter()}


def test_key_layout_and_every_key_expires(store: RedisSessionStore, client: redis.Redis) -> None:
    s = store.create(KEY, "kimi-k2", ttl_s=120)
    store.append(s.id, KEY, list(range(10)), [{"role": "user", "content": "hi"}])
    store.set_holder(s.id, "decode-0", 8)
    session_keys = store.session_keys(s.id)
    assert session_keys == [f"k2s:{{{s.id}}}:{part}" for part in ("meta", "tok", "bh", "msg")]
    owner_key, worker_key = store.owner_index_key(s.owner_hash), store.worker_index_key("decode-0")
    assert {k.decode() for k in client.scan_iter()} == {*session_keys, owner_key, worker_key}
    for key in (*session_keys, owner_key, worker_key):
        assert 0 < client.ttl(key) <= 120, key
    assert client.strlen(session_keys[1]) == 40 and client.strlen(session_keys[2]) == 16
    assert client.hget(session_keys[0], "holder") == b"decode-0"
    assert client.zscore(owner_key, s.id) == pytest.approx(store.get(s.id, KEY).expires_at_ms)
    assert client.smembers(worker_key) == {s.id.encode()}


def test_api_key_is_never_stored(store: RedisSessionStore, client: redis.Redis) -> None:
    s = store.create(KEY, "kimi-k2", metadata={"app": "x"})
    store.append(s.id, KEY, [1, 2, 3], [{"role": "user", "content": "hello"}])
    blob = repr(dump(client)).encode()
    assert s.owner_hash.encode() in blob
    assert KEY.encode() not in blob


def test_sessions_survive_a_redis_restart(server: EmbeddedRedis, store: RedisSessionStore) -> None:
    s = store.create(KEY, "kimi-k2", ttl_s=600)
    store.append(s.id, KEY, list(range(37)), [{"role": "user", "content": "step 1"}], tool_steps=2)
    store.set_holder(s.id, "decode-3", 36)
    before = store.history(s.id, KEY)
    server.restart()  # SIGTERM: Redis writes the AOF out, the new process replays it
    assert store.history(s.id, KEY) == before  # the old store reconnects by itself
    fresh = RedisSessionStore(server.url, CONFIG)
    assert fresh.history(s.id, KEY) == before
    assert fresh.get(s.id, KEY).holder == SessionHolder("decode-3", 36)
    assert fresh.append(s.id, KEY, [37, 38, 39], []).num_blocks == 10
    assert 0 < server.client().ttl(fresh.session_keys(s.id)[0]) <= 600
    fresh.close()


def test_two_stores_share_sessions(server: EmbeddedRedis, store: RedisSessionStore) -> None:
    other_router = RedisSessionStore(server.url, CONFIG)
    s = store.create(KEY, "kimi-k2")
    other_router.append(s.id, KEY, [5, 6, 7, 8], [])
    assert store.get(s.id, KEY).num_blocks == 1
    assert other_router.delete(s.id, KEY) and store.list(KEY) == []
    other_router.close()


def test_append_replayed_after_a_lost_reply_applies_once(store: RedisSessionStore) -> None:
    real = store._scripts["append"]

    def twice(keys: list[str], args: list[Any]) -> Any:  # what redis-py's retry does after a lost reply
        real(keys=keys, args=args)
        return real(keys=keys, args=args)

    store._scripts["append"] = twice  # type: ignore[assignment]
    s = store.create(KEY, "kimi-k2")
    after = store.append(s.id, KEY, [1, 2, 3], [{"role": "user", "content": "once"}], tool_steps=1)
    assert (after.num_tokens, after.num_messages, after.turn_count, after.tool_step_count) == (3, 1, 1, 1)


def test_unreachable_redis_is_a_typed_error() -> None:
    with EmbeddedRedis() as gone:
        url = gone.url.replace("redis://", "redis://:hunter2@")
    store = RedisSessionStore(url, CONFIG, retry=Retry(NoBackoff(), 0))
    with pytest.raises(SessionStoreUnavailable) as e:
        store.create(KEY, "kimi-k2")
    assert isinstance(e.value.cause, redis.ConnectionError)
    assert "hunter2" not in str(e.value) and "127.0.0.1" in str(e.value)
    store.close()
