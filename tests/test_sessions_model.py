"""RedisSessionStore against the InMemorySessionStore oracle over random operation sequences.

Both stores get the same operations with the same clock readings; every result (session,
history, list, or the error with its attributes) must match once Redis ids are mapped to the
oracle's ids, and every history's block hashes must equal `chain_hashes` of its tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from k2serve.cluster.redis_server import EmbeddedRedis, RedisServerConfig
from k2serve.kvcache.hashing import chain_hashes
from k2serve.sessions import (
    InMemorySessionStore,
    RedisSessionStore,
    Session,
    SessionError,
    SessionHistory,
    SessionStore,
    SessionStoreConfig,
)

OWNERS = ("sk-alice", "sk-bob")
WORKERS = ("decode-0", "decode-1")
CONFIG = SessionStoreConfig(
    block_size=3,
    max_tokens=40,
    max_append_tokens=12,
    max_append_bytes=150,
    max_messages_bytes=400,
    max_sessions_per_owner=3,
    default_ttl_s=3600,
    max_ttl_s=7200,
    max_metadata_bytes=40,
)
Pair = tuple[str, str]  # (Redis id, in-memory id) of one logical session

messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "tool"]), "content": st.text(max_size=30)}
    ),
    max_size=3,
)
token_lists = st.sampled_from([4, 8, 8, 13]).flatmap(  # 13 > max_append_tokens, 1 time in 4
    lambda n: st.lists(st.integers(0, 2**32 - 1), max_size=n)
)
foreign = st.sampled_from([False, False, False, True])  # act as the other owner 1 time in 4


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with EmbeddedRedis(RedisServerConfig(appendonly=False)) as server:
        yield server.url


class StoreModel(RuleBasedStateMachine):
    sessions = Bundle("sessions")

    def __init__(self, url: str) -> None:
        super().__init__()
        start = 1_700_000_000_000
        self.redis = RedisSessionStore(
            url, CONFIG, key_prefix=f"m{uuid.uuid4().hex[:8]}:", clock=itertools.count(start).__next__
        )
        self.memory = InMemorySessionStore(CONFIG, clock=itertools.count(start).__next__)
        self.to_memory_id: dict[str, str] = {}
        self.owner_of: dict[Pair, str] = {}
        self.num_tokens: dict[Pair, int] = {}  # as of the last successful append

    def owner(self, pair: Pair, foreign: bool) -> str:
        return next(o for o in OWNERS if (o == self.owner_of[pair]) != foreign)

    def teardown(self) -> None:
        self.redis.close()

    # --- comparing the two stores ----------------------------------------------------------------
    def normalize(self, value: Any) -> Any:
        """Rewrite Redis ids to the oracle's ids so the results compare equal."""
        if isinstance(value, Session):
            return dataclasses.replace(value, id=self.to_memory_id.get(value.id, value.id))
        if isinstance(value, SessionHistory):
            return dataclasses.replace(value, session=self.normalize(value.session))
        if isinstance(value, list):
            return [self.normalize(v) for v in value]
        return value

    def outcome(self, call: Callable[[], Any]) -> tuple[str, Any]:
        try:
            return "ok", self.normalize(call())
        except SessionError as e:
            attrs = dict(vars(e))
            if "session_id" in attrs:
                attrs["session_id"] = self.to_memory_id.get(attrs["session_id"], attrs["session_id"])
            return type(e).__name__, attrs

    def both(
        self, call: Callable[[SessionStore, str | None], Any], pair: Pair | None = None
    ) -> tuple[str, Any]:
        got = self.outcome(lambda: call(self.redis, pair[0] if pair else None))
        want = self.outcome(lambda: call(self.memory, pair[1] if pair else None))
        assert got == want
        return want

    # --- operations -------------------------------------------------------------------------------
    @rule(
        target=sessions,
        owner=st.sampled_from(OWNERS),
        ttl_s=st.sampled_from([None, 60, 7201]),
        metadata=st.dictionaries(st.text(max_size=4), st.text(max_size=8), max_size=3),
    )
    def create(self, owner: str, ttl_s: int | None, metadata: dict[str, str]) -> Any:
        got = self.outcome(lambda: self.redis.create(owner, "kimi-k2", ttl_s, metadata))
        want = self.outcome(lambda: self.memory.create(owner, "kimi-k2", ttl_s, metadata))
        if got[0] != "ok" or want[0] != "ok":
            assert got == want
            return multiple()
        self.to_memory_id[got[1].id] = want[1].id
        assert self.normalize(got[1]) == want[1]
        pair = (got[1].id, want[1].id)
        self.owner_of[pair] = owner
        self.num_tokens[pair] = 0
        return pair

    @rule(pair=sessions, foreign=foreign)
    def get(self, pair: Pair, foreign: bool) -> None:
        owner = self.owner(pair, foreign)
        self.both(lambda store, sid: store.get(sid, owner), pair)

    @rule(pair=sessions, foreign=foreign)
    def touch(self, pair: Pair, foreign: bool) -> None:
        owner = self.owner(pair, foreign)
        self.both(lambda store, sid: store.touch(sid, owner), pair)

    @rule(
        pair=sessions,
        foreign=foreign,
        tokens=token_lists,
        new_messages=messages,
        tool_steps=st.integers(0, 2),
        expect=st.sampled_from(["none", "none", "right", "wrong"]),
    )
    def append(
        self,
        pair: Pair,
        foreign: bool,
        tokens: list[int],
        new_messages: list[dict[str, str]],
        tool_steps: int,
        expect: str,
    ) -> None:
        owner = self.owner(pair, foreign)
        expected = {"none": None, "right": self.num_tokens[pair], "wrong": self.num_tokens[pair] + 1}[expect]
        status, session = self.both(
            lambda store, sid: store.append(
                sid, owner, tokens, new_messages, tool_steps, expected_num_tokens=expected
            ),
            pair,
        )
        if status == "ok":
            self.num_tokens[pair] = session.num_tokens
            self.check_history(pair, owner)

    @rule(
        pair=sessions,
        worker=st.sampled_from([*WORKERS, None]),
        cached=st.integers(0, 45),
        clamp=st.sampled_from([True, True, True, False]),  # usually a count the history has
    )
    def set_holder(self, pair: Pair, worker: str | None, cached: int, clamp: bool) -> None:
        if worker is None:
            cached = 0
        elif clamp:
            cached = min(cached, self.num_tokens[pair])
        self.both(lambda store, sid: store.set_holder(sid, worker, cached), pair)

    @precondition(lambda self: self.owner_of)
    @rule(worker=st.sampled_from(WORKERS))
    def clear_holder_for_worker(self, worker: str) -> None:
        self.both(lambda store, _: store.clear_holder_for_worker(worker))

    @rule(
        target=sessions, pair=consumes(sessions), foreign=foreign, skip=st.sampled_from([True, True, False])
    )
    def delete(self, pair: Pair, foreign: bool, skip: bool) -> Any:
        if skip:  # deletes would otherwise end most sessions before they grow
            return pair
        owner = self.owner(pair, foreign)
        _, deleted = self.both(lambda store, sid: store.delete(sid, owner), pair)
        if not deleted:
            return pair  # still live (or never was): keep using it
        del self.owner_of[pair], self.num_tokens[pair]
        self.both(lambda store, sid: store.get(sid, owner), pair)  # NotFound in both
        return multiple()

    @precondition(lambda self: self.owner_of)
    @rule(owner=st.sampled_from(OWNERS), limit=st.integers(1, 4))
    def list_sessions(self, owner: str, limit: int) -> None:
        self.both(lambda store, _: store.list(owner, limit))

    @rule(pair=sessions, foreign=foreign)
    def history(self, pair: Pair, foreign: bool) -> None:
        self.check_history(pair, self.owner(pair, foreign))

    def check_history(self, pair: Pair, owner: str) -> None:
        """Both histories agree, and the stored block hashes are the chain of the tokens."""
        status, history = self.both(lambda store, sid: store.history(sid, owner), pair)
        if status == "ok":
            assert history.block_hashes == tuple(chain_hashes(history.token_ids, CONFIG.block_size))
            assert history.session.num_blocks == len(history.block_hashes)
            assert len(history.token_ids) == history.session.num_tokens


def test_redis_store_matches_in_memory_oracle(redis_url: str) -> None:
    run_state_machine_as_test(
        lambda: StoreModel(redis_url),
        settings=settings(
            max_examples=60,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
