"""The SessionStore contract, run against both implementations (in-memory and a real Redis)."""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from k2serve.cluster.redis_server import EmbeddedRedis, RedisServerConfig
from k2serve.kvcache.hashing import chain_hashes
from k2serve.sessions import (
    InMemorySessionStore,
    InvalidSessionArgument,
    InvalidSessionId,
    RedisSessionStore,
    SessionConflict,
    SessionHolder,
    SessionLimitError,
    SessionNotFound,
    SessionStore,
    SessionStoreConfig,
)
from k2serve.sessions.codec import new_session_id

KEY, OTHER = "sk-alice", "sk-mallory"
SMALL = SessionStoreConfig(
    block_size=4,
    max_tokens=64,
    max_append_tokens=32,
    max_append_bytes=200,
    max_messages_bytes=500,
    max_sessions_per_owner=3,
    default_ttl_s=60,
    max_ttl_s=100,
    max_metadata_bytes=64,
)
MakeStore = Callable[..., SessionStore]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(RedisServerConfig(appendonly=False)) as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Iterator[MakeStore]:
    """make_store(config=SMALL, clock=None) -> a store of the parametrised kind, on an empty Redis."""
    stores: list[SessionStore] = []

    def make(config: SessionStoreConfig = SMALL, clock: Callable[[], int] | None = None) -> SessionStore:
        if request.param == "memory":
            store: SessionStore = InMemorySessionStore(config, clock)
        else:
            store = RedisSessionStore(request.getfixturevalue("redis_server").url, config, clock=clock)
        stores.append(store)
        return store

    if request.param == "redis":
        request.getfixturevalue("redis_server").client().flushall()
    yield make
    for store in stores:
        store.close()


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def fake_clock(start: int = 1_700_000_000_000) -> Callable[[], int]:
    """A clock that advances 1 ms per reading, so no two operations share a timestamp."""
    return itertools.count(start).__next__


def test_create_and_get(make_store: MakeStore) -> None:
    store = make_store()
    s = store.create(KEY, "kimi-k2", ttl_s=30, metadata={"app": "agent"})
    assert re.fullmatch(r"sess_[A-Za-z0-9_-]{32}", s.id)
    assert s.owner_hash == hashlib.sha256(KEY.encode()).hexdigest()
    assert (s.model, dict(s.metadata), s.ttl_s) == ("kimi-k2", {"app": "agent"}, 30)
    assert (s.num_tokens, s.num_blocks, s.num_messages, s.turn_count, s.tool_step_count) == (0, 0, 0, 0, 0)
    assert s.holder is None and s.created_ms == s.last_used_ms
    assert store.get(s.id, KEY) == s
    assert store.create(KEY, "kimi-k2").ttl_s == SMALL.default_ttl_s
    assert store.create(KEY, "kimi-k2").id != s.id


def test_append_and_history(make_store: MakeStore) -> None:
    store = make_store(clock=fake_clock())
    s = store.create(KEY, "kimi-k2")
    prompt = [user("list files"), {"role": "system", "content": "be brief"}]
    a = store.append(s.id, KEY, list(range(10)), prompt)
    b = store.append(s.id, KEY, [7, 8, 9], [{"role": "tool", "content": "a.txt"}], tool_steps=1)
    assert (b.num_tokens, b.num_blocks, b.num_messages, b.turn_count, b.tool_step_count) == (13, 3, 3, 1, 1)
    assert s.last_used_ms < a.last_used_ms < b.last_used_ms
    h = store.history(s.id, KEY)
    assert h.session == store.get(s.id, KEY) == b
    assert h.token_ids == [*range(10), 7, 8, 9]
    assert h.block_hashes == tuple(chain_hashes(h.token_ids, 4)) and h.block_size == 4
    assert list(h.messages) == [*prompt, {"role": "tool", "content": "a.txt"}]
    assert store.append(s.id, KEY, [], []).num_tokens == 13  # an empty append is a use only


def test_get_and_history_are_not_uses_touch_is(make_store: MakeStore) -> None:
    store = make_store(clock=fake_clock())
    s = store.create(KEY, "kimi-k2")
    assert (
        store.get(s.id, KEY).last_used_ms == store.history(s.id, KEY).session.last_used_ms == s.last_used_ms
    )
    assert store.touch(s.id, KEY).last_used_ms > s.last_used_ms


def test_unknown_and_foreign_ids_look_the_same(make_store: MakeStore) -> None:
    store = make_store()
    mine, unknown = store.create(KEY, "kimi-k2").id, new_session_id()
    for sid, owner in ((mine, OTHER), (unknown, KEY)):
        for op in (store.get, store.history, store.touch, lambda s, o: store.append(s, o, [1], [user("x")])):
            with pytest.raises(SessionNotFound) as e:
                op(sid, owner)
            assert str(e.value) == f"session {sid!r} not found" and e.value.session_id == sid
        assert store.delete(sid, owner) is False
    with pytest.raises(SessionNotFound):
        store.set_holder(unknown, "w0", 0)
    assert store.list(OTHER) == []
    assert store.get(mine, KEY).num_tokens == 0  # the foreign append did nothing


@pytest.mark.parametrize(
    "bad", ["", "sess_", "sess_" + "a" * 31, "sess_" + "a" * 33, "sess_" + "/" * 32, 42, None]
)
def test_invalid_ids(make_store: MakeStore, bad: Any) -> None:
    store = make_store()
    for op in (store.get, store.history, store.touch, store.delete):
        with pytest.raises(InvalidSessionId) as e:
            op(bad, KEY)
        assert e.value.session_id == bad
    with pytest.raises(InvalidSessionId):
        store.append(bad, KEY, [], [])
    with pytest.raises(InvalidSessionId):
        store.set_holder(bad, "w0", 0)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda st, sid: st.append(sid, KEY, [-1], []), "new_token_ids"),
        (lambda st, sid: st.append(sid, KEY, [1 << 32], []), "new_token_ids"),
        (lambda st, sid: st.append(sid, KEY, [1.0], []), "new_token_ids"),
        (lambda st, sid: st.append(sid, KEY, "abc", []), "new_token_ids"),
        (lambda st, sid: st.append(sid, KEY, [], [{"content": "no role"}]), "new_messages"),
        (lambda st, sid: st.append(sid, KEY, [], {"role": "user"}), "new_messages"),
        (lambda st, sid: st.append(sid, KEY, [], [{"role": "user", "x": float("nan")}]), "new_messages"),
        (lambda st, sid: st.append(sid, KEY, [], [{"role": "user", "x": object()}]), "new_messages"),
        (lambda st, sid: st.append(sid, KEY, [], [], tool_steps=-1), "tool_steps"),
        (lambda st, sid: st.append(sid, KEY, [], [], tool_steps=True), "tool_steps"),
        (lambda st, sid: st.append(sid, KEY, [], [], expected_num_tokens=-1), "expected_num_tokens"),
        (lambda st, sid: st.create(KEY, "m", ttl_s=0), "ttl_s"),
        (lambda st, sid: st.create(KEY, ""), "model"),
        (lambda st, sid: st.create(KEY, "m", metadata={"a": 1}), "metadata"),
        (lambda st, sid: st.create("", "m"), "owner_key"),
        (lambda st, sid: st.set_holder(sid, "has space", 0), "worker_id"),
        (lambda st, sid: st.set_holder(sid, "w0", -1), "cached_tokens"),
        (lambda st, sid: st.set_holder(sid, None, 3), "cached_tokens"),
        (lambda st, sid: st.clear_holder_for_worker(""), "worker_id"),
        (lambda st, sid: st.list(KEY, limit=0), "limit"),
    ],
)
def test_invalid_arguments(
    make_store: MakeStore, call: Callable[[SessionStore, str], Any], name: str
) -> None:
    store = make_store()
    sid = store.create(KEY, "kimi-k2").id
    with pytest.raises(InvalidSessionArgument) as e:
        call(store, sid)
    assert e.value.name == name
    assert store.history(sid, KEY).session.num_messages == 0


def test_limits_name_the_limit_and_change_nothing(make_store: MakeStore) -> None:
    store = make_store()
    sid = store.create(KEY, "kimi-k2").id
    store.append(sid, KEY, list(range(32)), [user("a" * 150)])
    store.append(sid, KEY, list(range(30)), [user("b" * 150)])
    before = store.history(sid, KEY)
    cases: list[tuple[Callable[[], Any], str, int, int]] = [
        (lambda: store.append(sid, KEY, [0] * 33, []), "max_append_tokens", 33, 32),
        (lambda: store.append(sid, KEY, [0, 1, 2], []), "max_tokens", 65, 64),
        (lambda: store.append(sid, KEY, [], [user("c" * 190)]), "max_append_bytes", 218, 200),
        (lambda: store.append(sid, KEY, [], [user("c" * 150)] * 2), "max_append_bytes", 356, 200),
        (lambda: store.append(sid, KEY, [], [user("c" * 150)]), "max_messages_bytes", 534, 500),
        (lambda: store.create(KEY, "m", ttl_s=101), "max_ttl_s", 101, 100),
        (lambda: store.create(KEY, "m", metadata={"k": "v" * 64}), "max_metadata_bytes", 72, 64),
        (lambda: store.set_holder(sid, "w0", 63), "num_tokens", 63, 62),
    ]
    for call, limit, value, maximum in cases:
        with pytest.raises(SessionLimitError) as e:
            call()
        assert (e.value.limit, e.value.value, e.value.maximum) == (limit, value, maximum)
    assert store.history(sid, KEY) == before
    store.append(sid, KEY, [0, 1], [])  # exactly max_tokens is allowed
    store.create(KEY, "m")
    store.create(KEY, "m")
    with pytest.raises(SessionLimitError) as e:
        store.create(KEY, "m")
    assert (e.value.limit, e.value.value, e.value.maximum) == ("max_sessions_per_owner", 4, 3)
    store.create(OTHER, "m")  # the limit is per owner
    store.delete(sid, KEY)
    store.create(KEY, "m")  # a deleted session frees its slot


def test_expected_num_tokens(make_store: MakeStore) -> None:
    store = make_store()
    sid = store.create(KEY, "kimi-k2").id
    store.append(sid, KEY, [1, 2, 3], [], expected_num_tokens=0)
    with pytest.raises(SessionConflict) as e:
        store.append(sid, KEY, [4], [], expected_num_tokens=0)
    assert (e.value.expected_num_tokens, e.value.actual_num_tokens) == (0, 3)
    assert store.append(sid, KEY, [4], [], expected_num_tokens=3).num_tokens == 4


def test_delete(make_store: MakeStore) -> None:
    store = make_store()
    sid = store.create(KEY, "kimi-k2").id
    store.append(sid, KEY, [1, 2, 3, 4, 5], [user("hi")])
    store.set_holder(sid, "w0", 5)
    assert store.delete(sid, OTHER) is False
    assert store.delete(sid, KEY) is True
    assert store.delete(sid, KEY) is False
    with pytest.raises(SessionNotFound):
        store.get(sid, KEY)
    assert store.list(KEY) == []
    assert store.clear_holder_for_worker("w0") == 0


def test_list_most_recent_first(make_store: MakeStore) -> None:
    store = make_store(clock=fake_clock())
    a, b, c = (store.create(KEY, "kimi-k2") for _ in range(3))
    store.create(OTHER, "kimi-k2")
    store.append(a.id, KEY, [1], [])
    assert [s.id for s in store.list(KEY)] == [a.id, c.id, b.id]
    assert [s.id for s in store.list(KEY, limit=2)] == [a.id, c.id]
    assert store.list(KEY)[0] == store.get(a.id, KEY)


def test_holder_bookkeeping(make_store: MakeStore) -> None:
    store = make_store()
    s1, s2, s3 = (store.create(KEY, "kimi-k2").id for _ in range(3))
    for sid in (s1, s2, s3):
        store.append(sid, KEY, list(range(8)), [])
    assert store.set_holder(s1, "decode-0", 8).holder == SessionHolder("decode-0", 8)
    store.set_holder(s2, "decode-0", 4)
    store.set_holder(s3, "decode-1", 8)
    store.set_holder(s2, "decode-1", 8)  # moved: decode-0 no longer holds s2
    assert store.get(s2, KEY).holder == SessionHolder("decode-1", 8)
    assert store.clear_holder_for_worker("decode-0") == 1
    assert store.clear_holder_for_worker("decode-0") == 0
    assert store.get(s1, KEY).holder is None
    assert store.set_holder(s3, None).holder is None
    assert store.clear_holder_for_worker("decode-1") == 1  # s2 only
    assert [store.get(s, KEY).holder for s in (s1, s2, s3)] == [None, None, None]
    assert store.clear_holder_for_worker("never-seen") == 0


def test_ttl_expiry_and_refresh(make_store: MakeStore) -> None:
    store = make_store()  # the real clock: Redis expires keys on its own
    kept, dropped = store.create(KEY, "kimi-k2", ttl_s=1), store.create(KEY, "kimi-k2", ttl_s=1)
    time.sleep(0.6)
    store.append(kept.id, KEY, [1], [])
    time.sleep(0.6)  # 1.2 s after create, 0.6 s after the append
    assert store.get(kept.id, KEY).num_tokens == 1
    with pytest.raises(SessionNotFound):
        store.get(dropped.id, KEY)
    assert [s.id for s in store.list(KEY)] == [kept.id]
    time.sleep(0.3)
    store.touch(kept.id, KEY)
    time.sleep(0.6)  # 1.5 s after the append: alive thanks to the touch
    assert store.get(kept.id, KEY).num_tokens == 1
    time.sleep(1.1)
    with pytest.raises(SessionNotFound):
        store.get(kept.id, KEY)
    assert store.list(KEY) == []


def test_racing_appends_lose_nothing(make_store: MakeStore) -> None:
    store = make_store(SessionStoreConfig(block_size=4, max_tokens=4096))
    sid = store.create(KEY, "kimi-k2").id
    threads, appends = 6, 15
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            start.wait()
            for i in range(appends):
                store.append(
                    sid, KEY, [t, i, 1000 + t], [{"role": "tool", "content": f"{t}:{i}"}], tool_steps=1
                )
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert errors == []
    h = store.history(sid, KEY)
    tokens = h.token_ids
    assert len(tokens) == threads * appends * 3 and h.session.tool_step_count == threads * appends
    triples = [tuple(tokens[k : k + 3]) for k in range(0, len(tokens), 3)]
    for t in range(threads):  # every append is whole, and each thread's appends are in order
        assert [tr for tr in triples if tr[0] == t] == [(t, i, 1000 + t) for i in range(appends)]
    assert [m["content"] for m in h.messages] == [f"{a}:{i}" for a, i, _ in triples]
    assert h.block_hashes == tuple(chain_hashes(tokens, 4))
