"""The session store interface: validation here, storage in the subclasses.

Every public method validates its arguments and reads the clock once, then calls one `_op`
hook, so all implementations reject the same inputs with the same errors in the same order.
"""

from __future__ import annotations

import abc
import builtins
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from k2serve.sessions.codec import (
    check_model,
    check_session_id,
    check_worker_id,
    encode_messages,
    encode_metadata,
    owner_hash,
    pack_tokens,
)
from k2serve.sessions.errors import InvalidSessionArgument, SessionLimitError
from k2serve.sessions.session import Session, SessionHistory, SessionHolder, SessionStoreConfig

__all__ = ["AppendOp", "SessionStore", "wall_clock_ms"]


def wall_clock_ms() -> int:
    """Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


def _check_int(name: str, value: object, minimum: int) -> int:
    if type(value) is not int or value < minimum:
        raise InvalidSessionArgument(name, value, f"must be an int >= {minimum}")
    return value


@dataclass(frozen=True)
class AppendOp:
    """One validated append: packed_tokens (LE uint32), messages (JSON texts), their total
    bytes, how many are role "user", the tool steps to add, and the optional length check."""

    packed_tokens: bytes
    messages: tuple[bytes, ...]
    messages_bytes: int
    user_turns: int
    tool_steps: int
    expected_num_tokens: int | None

    @property
    def num_tokens(self) -> int:
        return len(self.packed_tokens) // 4


class SessionStore(abc.ABC):
    """Agent sessions: an owner's token and message history plus routing bookkeeping.

    Contract (every implementation, checked by the shared test suite):

    - Ids come from `new_session_id()`; a malformed id raises InvalidSessionId before any lookup.
    - Ownership: a session belongs to the SHA-256 of the API key that created it. An unknown,
      expired or deleted id and another owner's id all raise the same SessionNotFound
      (`delete` returns False instead), so existence is never revealed across owners.
    - Expiry: a session lives `ttl_s` seconds after its last use; `create`, `append` and `touch`
      are uses (they set `last_used_ms` and restart the TTL on every stored piece); `get`,
      `history`, `list` and the holder methods are not.
    - `append` is atomic: either the tokens, their block hashes, the messages and the counters
      all change, or nothing does. Concurrent appends to one session serialise; none is lost.
      Check order: SessionNotFound, then SessionConflict (expected_num_tokens), then
      SessionLimitError("max_tokens"), then SessionLimitError("max_messages_bytes").
    - The holder (decode worker with the cached prefix) is cluster bookkeeping, not owner
      data: `set_holder` and `clear_holder_for_worker` take no API key and touch no TTL.
    - `list` returns live sessions, most recently used first (ties: by id), at most `limit`.
    - Implementations are thread-safe.
    """

    def __init__(
        self, config: SessionStoreConfig | None = None, clock: Callable[[], int] | None = None
    ) -> None:
        """clock: unix milliseconds; injectable so two stores can be compared step by step."""
        self.config = config or SessionStoreConfig()
        self._clock = clock or wall_clock_ms

    # --- public API ---------------------------------------------------------------------------
    def create(
        self,
        owner_key: str,
        model: str,
        ttl_s: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Session:
        """A new empty session owned by `owner_key`; ttl_s None means config.default_ttl_s.
        Raises SessionLimitError("max_sessions_per_owner" | "max_ttl_s" | "max_metadata_bytes")."""
        owner = owner_hash(owner_key)
        check_model(model)
        ttl = self.config.default_ttl_s if ttl_s is None else _check_int("ttl_s", ttl_s, 1)
        if ttl > self.config.max_ttl_s:
            raise SessionLimitError("max_ttl_s", ttl, self.config.max_ttl_s)
        meta = encode_metadata(metadata, self.config.max_metadata_bytes)
        return self._create(owner, model, ttl, meta, self._clock())

    def get(self, session_id: str, owner_key: str) -> Session:
        """The session's bookkeeping (not a use: the TTL is not refreshed)."""
        sid, owner = check_session_id(session_id), owner_hash(owner_key)
        return self._get(sid, owner, self._clock())

    def history(self, session_id: str, owner_key: str) -> SessionHistory:
        """The session with its tokens, block hashes and messages (not a use)."""
        sid, owner = check_session_id(session_id), owner_hash(owner_key)
        return self._history(sid, owner, self._clock())

    def touch(self, session_id: str, owner_key: str) -> Session:
        """Mark a use: restart the TTL and set last_used_ms; returns the session."""
        sid, owner = check_session_id(session_id), owner_hash(owner_key)
        return self._touch(sid, owner, self._clock())

    def append(
        self,
        session_id: str,
        owner_key: str,
        new_token_ids: Sequence[int],
        new_messages: Sequence[Mapping[str, Any]],
        tool_steps: int = 0,
        *,
        expected_num_tokens: int | None = None,
    ) -> Session:
        """Append token ids (prompt or generated, in [0, 2**32)) and OpenAI-style messages, add
        `tool_steps` to the tool-step count and one turn per "user" message; a use.

        expected_num_tokens: when set, apply only if the history has exactly that many tokens,
        else raise SessionConflict (lets a caller retry an append without duplicating it).
        Raises SessionLimitError("max_append_tokens" | "max_append_bytes" | "max_tokens" |
        "max_messages_bytes") and leaves the session unchanged.
        """
        sid, owner = check_session_id(session_id), owner_hash(owner_key)
        packed = pack_tokens(new_token_ids)
        if len(packed) // 4 > self.config.max_append_tokens:
            raise SessionLimitError("max_append_tokens", len(packed) // 4, self.config.max_append_tokens)
        messages, user_turns = encode_messages(new_messages)
        nbytes = sum(len(m) for m in messages)
        if nbytes > self.config.max_append_bytes:
            raise SessionLimitError("max_append_bytes", nbytes, self.config.max_append_bytes)
        _check_int("tool_steps", tool_steps, 0)
        if expected_num_tokens is not None:
            _check_int("expected_num_tokens", expected_num_tokens, 0)
        op = AppendOp(packed, tuple(messages), nbytes, user_turns, tool_steps, expected_num_tokens)
        return self._append(sid, owner, op, self._clock())

    def set_holder(self, session_id: str, worker_id: str | None, cached_tokens: int = 0) -> Session:
        """Record that `worker_id` holds the first `cached_tokens` tokens of the history in its
        KV cache (None clears the holder; cached_tokens must then be 0). Raises SessionNotFound,
        or SessionLimitError("num_tokens") when cached_tokens exceeds the history length."""
        sid = check_session_id(session_id)
        _check_int("cached_tokens", cached_tokens, 0)
        if worker_id is None:
            if cached_tokens:
                raise InvalidSessionArgument(
                    "cached_tokens", cached_tokens, "must be 0 when worker_id is None"
                )
            holder = None
        else:
            holder = SessionHolder(check_worker_id(worker_id), cached_tokens)
        return self._set_holder(sid, holder, self._clock())

    def clear_holder_for_worker(self, worker_id: str) -> int:
        """Forget `worker_id` as holder of every live session (the worker died or dropped its
        cache); returns how many sessions it held. Cost: O(sessions that worker held)."""
        return self._clear_holder_for_worker(check_worker_id(worker_id), self._clock())

    def delete(self, session_id: str, owner_key: str) -> bool:
        """Delete the session; False when there was no live session of this owner to delete."""
        sid, owner = check_session_id(session_id), owner_hash(owner_key)
        return self._delete(sid, owner, self._clock())

    def list(self, owner_key: str, limit: int = 100) -> builtins.list[Session]:
        """The owner's live sessions, most recently used first, at most `limit` (>= 1)."""
        owner = owner_hash(owner_key)
        _check_int("limit", limit, 1)
        sessions = self._list(owner, self._clock())
        sessions.sort(key=lambda s: (-s.last_used_ms, s.id))
        return sessions[:limit]

    def close(self) -> None:
        """Release connections; the stored sessions are unaffected. Nothing to release here."""
        return None

    # --- storage hooks: arguments are validated; `now` is unix ms -------------------------------
    @abc.abstractmethod
    def _create(self, owner: str, model: str, ttl_s: int, metadata: bytes, now: int) -> Session: ...

    @abc.abstractmethod
    def _get(self, sid: str, owner: str, now: int) -> Session: ...

    @abc.abstractmethod
    def _history(self, sid: str, owner: str, now: int) -> SessionHistory: ...

    @abc.abstractmethod
    def _touch(self, sid: str, owner: str, now: int) -> Session: ...

    @abc.abstractmethod
    def _append(self, sid: str, owner: str, op: AppendOp, now: int) -> Session: ...

    @abc.abstractmethod
    def _set_holder(self, sid: str, holder: SessionHolder | None, now: int) -> Session: ...

    @abc.abstractmethod
    def _clear_holder_for_worker(self, worker_id: str, now: int) -> int: ...

    @abc.abstractmethod
    def _delete(self, sid: str, owner: str, now: int) -> bool: ...

    @abc.abstractmethod
    def _list(self, owner: str, now: int) -> builtins.list[Session]:
        """Every live session of the owner, in any order."""
