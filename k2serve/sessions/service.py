"""SessionService: the asynchronous face of a SessionStore for the API layers and the router.

Store calls are blocking (redis-py), so they run in a thread. The owner of a session is the API key
the client presented ("anonymous" when the server has none); the store keeps only its SHA-256.

What a turn records: the new messages and the assistant's reply (the text needed to rebuild the
context), and the token history: the stored tokens are the latest turn's prompt, extended turn by turn
(each turn's prompt starts with the previous one: the same messages rendered, then the generation
prompt, which is also how the reply's rendering begins). Replies' tokens are not in it, because the K2
template re-renders earlier replies without their reasoning. When a prompt does not extend the stored
tokens (history edited through the API), the tokens stay and only the messages are appended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from k2serve.engine.protocol import SessionHint
from k2serve.sessions.connection import RedisConnection
from k2serve.sessions.errors import SessionStoreUnavailable
from k2serve.sessions.redis_store import RedisSessionStore
from k2serve.sessions.responses import InMemoryResponseStore, RedisResponseStore, ResponseStore
from k2serve.sessions.session import Session, SessionStoreConfig
from k2serve.sessions.store import SessionStore

logger = logging.getLogger(__name__)
ANONYMOUS = "anonymous"

TurnRecorder = Callable[[dict[str, Any], str | None], Awaitable[None]]
"""Called as `await record(reply, served_by)` once a turn finished (see SessionService.turn_recorder)."""


class SessionService:
    def __init__(self, store: SessionStore, responses: ResponseStore | None = None) -> None:
        self.store = store
        self.responses = responses or InMemoryResponseStore()  # the Responses API's records
        # KV accounting for /metrics: session -> (holder, cached tokens), as recorded by this process.
        self.held: dict[str, tuple[str, int]] = {}

    def kv_blocks(self) -> tuple[int, int]:
        """(sessions whose prefix a worker holds, KV blocks those prefixes take), from this process's view."""
        bs = self.store.config.block_size
        return len(self.held), sum(-(-tokens // bs) for _, tokens in self.held.values())

    @classmethod
    def connect(
        cls, redis: RedisConnection | str, config: SessionStoreConfig | None = None
    ) -> SessionService:
        return cls(RedisSessionStore(redis, config), RedisResponseStore(redis))

    async def check(self) -> None:
        """At startup: stop on a Redis that refuses us (SessionStoreRefused: password, TLS); only
        log one that cannot be reached yet (sessions answer UNAVAILABLE until it can)."""
        if not isinstance(self.store, RedisSessionStore):
            return
        try:
            await asyncio.to_thread(self.store.check)
        except SessionStoreUnavailable as e:
            logger.warning("%s; sessions answer UNAVAILABLE until it is reachable", e)

    @staticmethod
    def owner(api_key: str | None) -> str:
        return api_key or ANONYMOUS

    async def create(
        self,
        owner: str,
        model: str,
        ttl_s: int | None,
        messages: Sequence[Mapping[str, Any]],
        metadata: Mapping[str, str] | None = None,
    ) -> Session:
        s = await asyncio.to_thread(self.store.create, owner, model, ttl_s, metadata)
        if messages:
            s = await asyncio.to_thread(self.store.append, s.id, owner, [], list(messages))
        return s

    async def get(self, session_id: str, owner: str) -> Session:
        return await asyncio.to_thread(self.store.touch, session_id, owner)

    async def delete(self, session_id: str, owner: str) -> bool:
        deleted = await asyncio.to_thread(self.store.delete, session_id, owner)
        if deleted:
            self.held.pop(session_id, None)
        return deleted

    async def append_messages(
        self, session_id: str, owner: str, messages: Sequence[Mapping[str, Any]], tool_steps: int = 0
    ) -> Session:
        return await asyncio.to_thread(self.store.append, session_id, owner, [], list(messages), tool_steps)

    async def messages(self, session_id: str, owner: str) -> list[dict[str, Any]]:
        """The session's messages so far, oldest first (raises SessionNotFound like `get`)."""
        history = await asyncio.to_thread(self.store.history, session_id, owner)
        return [dict(m) for m in history.messages]

    async def context(self, session_id: str, owner: str) -> tuple[list[dict[str, Any]], SessionHint]:
        """The session's messages so far and the routing hint for its next turn."""
        s = await asyncio.to_thread(self.store.touch, session_id, owner)
        history = await asyncio.to_thread(self.store.history, session_id, owner)
        hint = SessionHint(
            session_id, s.holder.worker_id if s.holder else None, s.holder.cached_tokens if s.holder else 0
        )
        return [dict(m) for m in history.messages], hint

    async def record_turn(
        self,
        session_id: str,
        owner: str,
        new_messages: Sequence[Mapping[str, Any]],
        reply: Mapping[str, Any],
        prompt_ids: Sequence[int],
    ) -> tuple[Session, int]:
        """Append the turn; returns the session and how many leading tokens of the context this turn's
        prompt covers (what the serving worker now caches; 0 when the prompt did not extend the history)."""
        history = await asyncio.to_thread(self.store.history, session_id, owner)
        stored = history.token_ids
        prompt = list(prompt_ids)
        consistent = prompt[: len(stored)] == stored
        tokens = prompt[len(stored) :] if consistent else []
        tool_steps = sum(1 for m in new_messages if m.get("role") == "tool")
        s = await asyncio.to_thread(
            self.store.append, session_id, owner, tokens, [*new_messages, dict(reply)], tool_steps
        )
        return s, len(prompt) if consistent else 0

    def turn_recorder(
        self, session_id: str, owner: str, new_messages: Sequence[Mapping[str, Any]], prompt: list[int]
    ) -> TurnRecorder:
        """What a front door calls once a turn finished: append the turn's new messages and the reply
        (fields set to None dropped), then record that `served_by` (the worker that served the turn;
        None: unknown) caches the turn's context."""

        async def record(reply: dict[str, Any], served_by: str | None) -> None:
            reply = {k: v for k, v in reply.items() if v is not None}
            _, cached = await self.record_turn(session_id, owner, new_messages, reply, prompt)
            if served_by is not None:
                await self.set_holder(session_id, served_by, cached)

        return record

    async def set_holder(self, session_id: str, worker_id: str | None, cached_tokens: int) -> None:
        if worker_id is None or cached_tokens <= 0:
            self.held.pop(session_id, None)
        else:
            self.held[session_id] = (worker_id, cached_tokens)
        try:
            await asyncio.to_thread(self.store.set_holder, session_id, worker_id, cached_tokens)
        except Exception:  # the holder is a routing hint: losing it costs a re-prefill, never data
            logger.exception("could not record the holder of session %s", session_id)

    async def forget_worker(self, worker_id: str) -> None:
        for sid in [sid for sid, (w, _) in self.held.items() if w == worker_id]:
            del self.held[sid]
        try:
            await asyncio.to_thread(self.store.clear_holder_for_worker, worker_id)
        except Exception:
            logger.exception("could not clear the sessions held by %s", worker_id)

    def close(self) -> None:
        self.store.close()
        self.responses.close()
