"""The reference session store: plain dicts under one lock, expiry checked on access.

It is the test oracle for `RedisSessionStore` and fits a single-process deployment; it is not
shared between processes and loses everything on exit. `list` and `clear_holder_for_worker`
scan every session (O(all sessions)), which is fine at that scale.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from k2serve.sessions.codec import (
    decode_json,
    extend_block_chain,
    new_session_id,
    unpack_hashes,
)
from k2serve.sessions.errors import SessionConflict, SessionLimitError, SessionNotFound
from k2serve.sessions.session import Session, SessionHistory, SessionHolder, SessionStoreConfig
from k2serve.sessions.store import AppendOp, SessionStore

__all__ = ["InMemorySessionStore"]


@dataclass
class _Record:
    owner: str
    model: str
    metadata: bytes
    ttl_s: int
    created_ms: int
    last_used_ms: int
    tokens: bytearray = field(default_factory=bytearray)  # LE uint32
    hashes: bytearray = field(default_factory=bytearray)  # LE uint64, one per full block
    messages: list[bytes] = field(default_factory=list)
    messages_bytes: int = 0
    turn_count: int = 0
    tool_step_count: int = 0
    holder: SessionHolder | None = None

    def snapshot(self, sid: str) -> Session:
        return Session(
            id=sid,
            owner_hash=self.owner,
            model=self.model,
            metadata=decode_json(self.metadata),
            ttl_s=self.ttl_s,
            created_ms=self.created_ms,
            last_used_ms=self.last_used_ms,
            num_tokens=len(self.tokens) // 4,
            num_blocks=len(self.hashes) // 8,
            num_messages=len(self.messages),
            turn_count=self.turn_count,
            tool_step_count=self.tool_step_count,
            holder=self.holder,
        )


class InMemorySessionStore(SessionStore):
    """`SessionStore` in this process's memory (see the module docstring)."""

    def __init__(
        self, config: SessionStoreConfig | None = None, clock: Callable[[], int] | None = None
    ) -> None:
        super().__init__(config, clock)
        self._lock = threading.Lock()
        self._sessions: dict[str, _Record] = {}

    def _live(self, sid: str, now: int) -> _Record | None:
        """The record if it has not expired at `now` (an expired one is dropped); hold the lock."""
        rec = self._sessions.get(sid)
        if rec is not None and now >= rec.last_used_ms + 1000 * rec.ttl_s:
            del self._sessions[sid]
            return None
        return rec

    def _owned(self, sid: str, owner: str, now: int) -> _Record:
        rec = self._live(sid, now)
        if rec is None or rec.owner != owner:
            raise SessionNotFound(sid)
        return rec

    def _create(self, owner: str, model: str, ttl_s: int, metadata: bytes, now: int) -> Session:
        with self._lock:
            live = sum(1 for sid in list(self._sessions) if (r := self._live(sid, now)) and r.owner == owner)
            if live >= self.config.max_sessions_per_owner:
                raise SessionLimitError(
                    "max_sessions_per_owner", live + 1, self.config.max_sessions_per_owner
                )
            sid = new_session_id()
            rec = _Record(owner, model, metadata, ttl_s, created_ms=now, last_used_ms=now)
            self._sessions[sid] = rec
            return rec.snapshot(sid)

    def _get(self, sid: str, owner: str, now: int) -> Session:
        with self._lock:
            return self._owned(sid, owner, now).snapshot(sid)

    def _history(self, sid: str, owner: str, now: int) -> SessionHistory:
        with self._lock:
            rec = self._owned(sid, owner, now)
            return SessionHistory(
                session=rec.snapshot(sid),
                block_size=self.config.block_size,
                packed_tokens=bytes(rec.tokens),
                block_hashes=unpack_hashes(bytes(rec.hashes)),
                messages=tuple(decode_json(m) for m in rec.messages),
            )

    def _touch(self, sid: str, owner: str, now: int) -> Session:
        with self._lock:
            rec = self._owned(sid, owner, now)
            rec.last_used_ms = now
            return rec.snapshot(sid)

    def _append(self, sid: str, owner: str, op: AppendOp, now: int) -> Session:
        cfg = self.config
        with self._lock:
            rec = self._owned(sid, owner, now)
            num_tokens = len(rec.tokens) // 4
            if op.expected_num_tokens is not None and op.expected_num_tokens != num_tokens:
                raise SessionConflict(sid, op.expected_num_tokens, num_tokens)
            if num_tokens + op.num_tokens > cfg.max_tokens:
                raise SessionLimitError("max_tokens", num_tokens + op.num_tokens, cfg.max_tokens)
            if rec.messages_bytes + op.messages_bytes > cfg.max_messages_bytes:
                raise SessionLimitError(
                    "max_messages_bytes", rec.messages_bytes + op.messages_bytes, cfg.max_messages_bytes
                )
            num_blocks = len(rec.hashes) // 8
            parent = unpack_hashes(bytes(rec.hashes[-8:]))[0] if num_blocks else None
            tail = bytes(rec.tokens[num_blocks * cfg.block_size * 4 :])
            rec.hashes += extend_block_chain(parent, tail, op.packed_tokens, cfg.block_size)
            rec.tokens += op.packed_tokens
            rec.messages.extend(op.messages)
            rec.messages_bytes += op.messages_bytes
            rec.turn_count += op.user_turns
            rec.tool_step_count += op.tool_steps
            rec.last_used_ms = now
            return rec.snapshot(sid)

    def _set_holder(self, sid: str, holder: SessionHolder | None, now: int) -> Session:
        with self._lock:
            rec = self._live(sid, now)
            if rec is None:
                raise SessionNotFound(sid)
            num_tokens = len(rec.tokens) // 4
            if holder is not None and holder.cached_tokens > num_tokens:
                raise SessionLimitError("num_tokens", holder.cached_tokens, num_tokens)
            rec.holder = holder
            return rec.snapshot(sid)

    def _clear_holder_for_worker(self, worker_id: str, now: int) -> int:
        with self._lock:
            cleared = 0
            for sid in list(self._sessions):
                rec = self._live(sid, now)
                if rec is not None and rec.holder is not None and rec.holder.worker_id == worker_id:
                    rec.holder = None
                    cleared += 1
            return cleared

    def _delete(self, sid: str, owner: str, now: int) -> bool:
        with self._lock:
            rec = self._live(sid, now)
            if rec is None or rec.owner != owner:
                return False
            del self._sessions[sid]
            return True

    def _list(self, owner: str, now: int) -> list[Session]:
        with self._lock:
            out = []
            for sid in list(self._sessions):
                rec = self._live(sid, now)
                if rec is not None and rec.owner == owner:
                    out.append(rec.snapshot(sid))
            return out
