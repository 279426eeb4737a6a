"""Stored Responses-API responses: response id -> (owner, the session holding its conversation, how many
of that session's messages are its conversation, the response object as the API shows it).

A chain of responses (`previous_response_id`) lives in one session from its second response on (the
first one's record holds its own messages): each response's turn is appended to it, and its record says how long the conversation was once it finished, so continuing from an
older response of the chain (a branch) knows which prefix of the session's messages is its history.
Records are visible only to their owner (the API key; the store keeps its SHA-256) and expire like
sessions (`ttl_s`, default one hour). Two implementations with one contract: in this process's memory
(the reference, and `k2serve serve` without Redis) and in Redis (the cluster's session store).
"""

from __future__ import annotations

import abc
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from k2serve.sessions.connection import RedisConnection

DEFAULT_TTL_S = 3600
SWEEP_EVERY = 256  # InMemoryResponseStore drops its expired records every this many puts


@dataclass(frozen=True)
class ResponseRecord:
    """session_id: the session holding the conversation, or None for the first response of a chain,
    whose conversation (its input messages and its reply) is `messages` (no session is spent on a
    response nobody continues). num_messages: how many of the session's messages (or of `messages`)
    are this response's conversation, its reply included. response: the object GET returns."""

    session_id: str | None
    num_messages: int
    response: dict[str, Any]
    messages: list[dict[str, Any]] | None = None


def _owner_hash(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()


def _encode(owner: str, record: ResponseRecord) -> str:
    return json.dumps(
        {
            "owner": _owner_hash(owner),
            "session_id": record.session_id,
            "num_messages": record.num_messages,
            "response": record.response,
            "messages": record.messages,
        },
        ensure_ascii=False,
    )


def _decode(data: str | bytes, owner: str) -> ResponseRecord | None:
    """The record when `owner` owns it, else None (as if it did not exist)."""
    obj = json.loads(data)
    if obj["owner"] != _owner_hash(owner):
        return None
    return ResponseRecord(obj["session_id"], obj["num_messages"], obj["response"], obj.get("messages"))


class ResponseStore(abc.ABC):
    """put / get / delete of records by response id, for one owner at a time. `get` and `delete` of
    another owner's record behave as for an unknown id (None / False). Blocking calls (run them in a
    thread from async code)."""

    def __init__(self, ttl_s: int = DEFAULT_TTL_S) -> None:
        self.ttl_s = ttl_s

    @abc.abstractmethod
    def put(self, response_id: str, owner: str, record: ResponseRecord) -> None: ...

    @abc.abstractmethod
    def get(self, response_id: str, owner: str) -> ResponseRecord | None: ...

    @abc.abstractmethod
    def delete(self, response_id: str, owner: str) -> bool: ...

    def close(self) -> None:
        return None


class InMemoryResponseStore(ResponseStore):
    def __init__(self, ttl_s: int = DEFAULT_TTL_S) -> None:
        super().__init__(ttl_s)
        self._lock = threading.Lock()
        self._records: dict[str, tuple[float, str]] = {}  # id -> (expiry, encoded record)
        self._puts = 0

    def put(self, response_id: str, owner: str, record: ResponseRecord) -> None:
        now = time.monotonic()
        with self._lock:
            self._records[response_id] = (now + self.ttl_s, _encode(owner, record))
            self._puts += 1
            if self._puts % SWEEP_EVERY == 0:  # drop expired records: memory holds one TTL of traffic
                for rid in [rid for rid, (expiry, _) in self._records.items() if expiry <= now]:
                    del self._records[rid]

    def __len__(self) -> int:
        return len(self._records)

    def _live(self, response_id: str) -> str | None:
        entry = self._records.get(response_id)
        if entry is None or entry[0] <= time.monotonic():
            self._records.pop(response_id, None)
            return None
        return entry[1]

    def get(self, response_id: str, owner: str) -> ResponseRecord | None:
        with self._lock:
            data = self._live(response_id)
        return None if data is None else _decode(data, owner)

    def delete(self, response_id: str, owner: str) -> bool:
        with self._lock:
            data = self._live(response_id)
            if data is None or _decode(data, owner) is None:
                return False
            del self._records[response_id]
            return True


class RedisResponseStore(ResponseStore):
    """Records as JSON strings under `{key_prefix}resp:{id}` with a TTL."""

    def __init__(
        self, url: str | RedisConnection, ttl_s: int = DEFAULT_TTL_S, key_prefix: str = "k2s:"
    ) -> None:
        """url: a redis:// / rediss:// URL or the RedisConnection (password file, TLS files) to use."""
        super().__init__(ttl_s)
        connection = url if isinstance(url, RedisConnection) else RedisConnection(url)
        self._redis = connection.client(socket_timeout=5.0, socket_connect_timeout=5.0)
        self._prefix = f"{key_prefix}resp:"

    def put(self, response_id: str, owner: str, record: ResponseRecord) -> None:
        self._redis.set(self._prefix + response_id, _encode(owner, record), ex=self.ttl_s)

    def get(self, response_id: str, owner: str) -> ResponseRecord | None:
        data = self._redis.get(self._prefix + response_id)
        return None if data is None else _decode(data, owner)

    def delete(self, response_id: str, owner: str) -> bool:
        if self.get(response_id, owner) is None:
            return False
        return bool(self._redis.delete(self._prefix + response_id))

    def close(self) -> None:
        self._redis.close()
