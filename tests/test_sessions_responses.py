"""The Responses API's record store, one contract for both implementations (memory, real Redis):
put / get / delete, owner isolation (another key sees nothing, deletes nothing), expiry."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from k2serve.cluster.redis_server import EmbeddedRedis
from k2serve.sessions.responses import (
    SWEEP_EVERY,
    InMemoryResponseStore,
    RedisResponseStore,
    ResponseRecord,
    ResponseStore,
)

RECORD = ResponseRecord("sess_x", 3, {"id": "resp_1", "object": "response", "output": [{"type": "message"}]})


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with EmbeddedRedis() as srv:
        yield srv.url


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Iterator[Callable[..., ResponseStore]]:
    if request.param == "memory":
        yield lambda ttl_s=3600: InMemoryResponseStore(ttl_s)
    else:
        url = request.getfixturevalue("redis_url")
        yield lambda ttl_s=3600: RedisResponseStore(url, ttl_s, key_prefix=f"t{time.monotonic_ns()}:")


def test_put_get_delete_by_owner(make_store: Callable[..., ResponseStore]) -> None:
    store = make_store()
    store.put("resp_1", "alice", RECORD)
    assert store.get("resp_1", "alice") == RECORD
    assert store.get("resp_1", "bob") is None and store.get("resp_2", "alice") is None
    assert store.delete("resp_1", "bob") is False
    assert store.get("resp_1", "alice") == RECORD
    assert store.delete("resp_1", "alice") is True
    assert store.get("resp_1", "alice") is None and store.delete("resp_1", "alice") is False
    store.close()


def test_records_expire(make_store: Callable[..., ResponseStore]) -> None:
    store = make_store(1)
    store.put("resp_1", "alice", RECORD)
    time.sleep(2.2)
    assert store.get("resp_1", "alice") is None
    store.close()


def test_memory_store_sweeps_expired_records(monkeypatch: pytest.MonkeyPatch) -> None:
    store = InMemoryResponseStore(ttl_s=1)
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    for i in range(SWEEP_EVERY - 1):
        store.put(f"resp_{i}", "alice", RECORD)
    clock[0] += 2
    store.put("resp_new", "alice", RECORD)  # the sweep: every earlier record has expired
    assert len(store) == 1 and store.get("resp_new", "alice") == RECORD
