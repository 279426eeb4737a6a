"""`SessionStore` in Redis: shared by every router process and durable with AOF.

Each operation is one Lua script (see `redis_lua` for the key layout), except `append`, which
needs the block hashes of the new tokens and Lua cannot compute them: it reads the history's
tail and last block hash, hashes in Python, and writes with a compare-and-set on the history
length, retrying when a concurrent append got in first. Each append carries a random id that
the script records, so when redis-py retries a call whose reply was lost, the retry sees the
append already applied and does not repeat it. (If another append to the session lands between
the lost reply and the retry, the retry cannot tell and appends again; callers that must never
duplicate pass `expected_num_tokens`.)
"""

from __future__ import annotations

import contextlib
import secrets
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from k2serve.sessions.codec import (
    decode_json,
    extend_block_chain,
    new_session_id,
    unpack_hashes,
)
from k2serve.sessions.connection import RedisConnection
from k2serve.sessions.errors import (
    SessionConflict,
    SessionLimitError,
    SessionNotFound,
    SessionStoreRefused,
    SessionStoreUnavailable,
)
from k2serve.sessions.redis_lua import SCRIPTS
from k2serve.sessions.session import Session, SessionHistory, SessionHolder, SessionStoreConfig
from k2serve.sessions.store import AppendOp, SessionStore

__all__ = ["RedisSessionStore"]

_MAX_APPEND_ATTEMPTS = 100
_SOCKET_TIMEOUT_S = 30.0  # a 256K-token history is ~1 MiB of tokens plus its messages
_CONNECT_TIMEOUT_S = 5.0


def _tls_failure(e: BaseException) -> bool:
    """Whether a redis-py ConnectionError came from the TLS handshake."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "SSL" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class RedisSessionStore(SessionStore):
    """Sessions in the Redis at `url` (a `RedisConnection`, or a URL such as
    redis://[:password@]host:port/db or rediss://... for TLS), under `key_prefix`.

    Thread-safe (one redis-py connection pool). Several stores (processes) may share one Redis
    and prefix; their clocks should agree to within a second (they stamp last_used_ms), while
    expiry itself runs on the Redis server's clock.
    """

    def __init__(
        self,
        url: str | RedisConnection,
        config: SessionStoreConfig | None = None,
        *,
        key_prefix: str = "k2s:",
        clock: Callable[[], int] | None = None,
        retry: Retry | None = None,
    ) -> None:
        """retry: redis-py's policy for lost connections; None keeps redis-py's default (a few
        retries with backoff, several seconds in all), Retry(NoBackoff(), 0) fails at once."""
        super().__init__(config, clock)
        self.key_prefix = key_prefix
        self.connection = url if isinstance(url, RedisConnection) else RedisConnection(url)
        self._where = self.connection.where
        options: dict[str, Any] = {"retry": retry} if retry is not None else {}
        self._redis = self.connection.client(
            socket_timeout=_SOCKET_TIMEOUT_S, socket_connect_timeout=_CONNECT_TIMEOUT_S, **options
        )
        self._scripts = {name: self._redis.register_script(src) for name, src in SCRIPTS.items()}

    # --- key layout ------------------------------------------------------------------------------
    def session_keys(self, sid: str) -> list[str]:
        """The keys of one session: meta, tok, bh, msg (one hash tag, so one cluster slot)."""
        base = f"{self.key_prefix}{{{sid}}}:"
        return [base + "meta", base + "tok", base + "bh", base + "msg"]

    def owner_index_key(self, owner: str) -> str:
        return f"{self.key_prefix}owner:{owner}"

    def worker_index_key(self, worker_id: str) -> str:
        return f"{self.key_prefix}worker:{worker_id}"

    def close(self) -> None:
        self._redis.close()

    def check(self) -> None:
        """One PING on a fresh connection, without retries: raises SessionStoreRefused when Redis
        refuses the password (or needs one) or the TLS handshake fails, SessionStoreUnavailable when
        it cannot be reached. Entry points call it at startup so that a misconfiguration stops them."""
        client = self.connection.client(
            socket_timeout=_CONNECT_TIMEOUT_S,
            socket_connect_timeout=_CONNECT_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            client.ping()
        except redis.AuthenticationError as e:
            reason = (
                "it requires a password and none was given (--redis-url redis://:PASSWORD@... or "
                "--redis-password-file)"
                if "must be called with the client already authenticated" in str(e) or "NOAUTH" in str(e)
                else "it refused the password (check --redis-url / --redis-password-file)"
            )
            raise SessionStoreRefused(self._where, reason, e) from e
        except redis.ResponseError as e:  # a server without requirepass answers AUTH with an error
            raise SessionStoreRefused(self._where, "it refused AUTH", e) from e
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if _tls_failure(e):
                hint = "--redis-ca / --redis-cert / --redis-key" if self.connection.tls else "rediss://"
                raise SessionStoreRefused(self._where, f"the TLS handshake failed (check {hint})", e) from e
            raise SessionStoreUnavailable(self._where, e) from e
        finally:
            client.close()

    # --- plumbing --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise SessionStoreUnavailable(self._where, e) from e

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        with self._reachable():
            return self._scripts[script](keys=keys, args=args)

    def _ok(self, reply: list[Any], sid: str) -> list[Any]:
        """The payload of an OK reply; NOTFOUND and LIMIT replies raise."""
        status = reply[0]
        if status == b"OK":
            return reply[1:]
        if status == b"NOTFOUND":
            raise SessionNotFound(sid)
        if status == b"LIMIT":
            raise SessionLimitError(reply[1].decode(), int(reply[2]), int(reply[3]))
        raise AssertionError(f"unexpected reply {reply[:2]!r} for session {sid!r}")

    def _session(self, sid: str, summary: list[Any]) -> Session:
        flat, tok_len, bh_len, num_messages = summary
        m = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
        worker = m["holder"].decode()
        return Session(
            id=sid,
            owner_hash=m["owner"].decode(),
            model=m["model"].decode("utf-8"),
            metadata=decode_json(m["metadata"]),
            ttl_s=int(m["ttl_s"]),
            created_ms=int(m["created_ms"]),
            last_used_ms=int(m["last_used_ms"]),
            num_tokens=tok_len // 4,
            num_blocks=bh_len // 8,
            num_messages=num_messages,
            turn_count=int(m["turns"]),
            tool_step_count=int(m["tool_steps"]),
            holder=SessionHolder(worker, int(m["cached"])) if worker else None,
        )

    # --- storage hooks ---------------------------------------------------------------------------
    def _create(self, owner: str, model: str, ttl_s: int, metadata: bytes, now: int) -> Session:
        max_sessions = self.config.max_sessions_per_owner
        while True:  # loops only on a 192-bit id collision
            sid = new_session_id()
            keys = [*self.session_keys(sid), self.owner_index_key(owner)]
            reply = self._run(
                "create", keys, [self.key_prefix, sid, owner, model, metadata, ttl_s, now, max_sessions]
            )
            if reply[0] != b"EXISTS":
                return self._session(sid, self._ok(reply, sid)[0])

    def _get(self, sid: str, owner: str, now: int) -> Session:
        reply = self._run("get", self.session_keys(sid), [owner, 0])
        return self._session(sid, self._ok(reply, sid)[0])

    def _history(self, sid: str, owner: str, now: int) -> SessionHistory:
        summary, tokens, hashes, messages = self._ok(
            self._run("get", self.session_keys(sid), [owner, 1]), sid
        )
        return SessionHistory(
            session=self._session(sid, summary),
            block_size=self.config.block_size,
            packed_tokens=tokens,
            block_hashes=unpack_hashes(hashes),
            messages=tuple(decode_json(m) for m in messages),
        )

    def _touch(self, sid: str, owner: str, now: int) -> Session:
        keys = [*self.session_keys(sid), self.owner_index_key(owner)]
        reply = self._run("touch", keys, [self.key_prefix, sid, owner, now])
        return self._session(sid, self._ok(reply, sid)[0])

    def _append(self, sid: str, owner: str, op: AppendOp, now: int) -> Session:
        cfg = self.config
        keys = [*self.session_keys(sid), self.owner_index_key(owner)]
        append_id = secrets.token_hex(8)
        num_tokens = 0
        for _ in range(_MAX_APPEND_ATTEMPTS):
            tail_reply = self._run("read_tail", keys[:3], [owner, cfg.block_size])
            tok_len, tail, last_hash, messages_bytes = self._ok(tail_reply, sid)
            num_tokens = tok_len // 4
            # The same checks as the script makes, on this snapshot, before spending time hashing.
            if op.expected_num_tokens is not None and op.expected_num_tokens != num_tokens:
                raise SessionConflict(sid, op.expected_num_tokens, num_tokens)
            if num_tokens + op.num_tokens > cfg.max_tokens:
                raise SessionLimitError("max_tokens", num_tokens + op.num_tokens, cfg.max_tokens)
            if messages_bytes + op.messages_bytes > cfg.max_messages_bytes:
                raise SessionLimitError(
                    "max_messages_bytes", messages_bytes + op.messages_bytes, cfg.max_messages_bytes
                )
            parent = unpack_hashes(last_hash)[0] if last_hash else None
            hashes = extend_block_chain(parent, tail, op.packed_tokens, cfg.block_size)
            args = [self.key_prefix, sid, owner, tok_len, op.packed_tokens, hashes, now, op.tool_steps]
            args += [op.user_turns, op.messages_bytes, cfg.max_tokens, cfg.max_messages_bytes, append_id]
            reply = self._run("append", keys, [*args, *op.messages])
            if reply[0] != b"CONFLICT":  # CONFLICT: another append got in first; hash again
                return self._session(sid, self._ok(reply, sid)[0])
        raise SessionConflict(sid, None, num_tokens)

    def _set_holder(self, sid: str, holder: SessionHolder | None, now: int) -> Session:
        worker, cached = (holder.worker_id, holder.cached_tokens) if holder else ("", 0)
        reply = self._run("set_holder", self.session_keys(sid), [self.key_prefix, sid, worker, cached])
        return self._session(sid, self._ok(reply, sid)[0])

    def _clear_holder_for_worker(self, worker_id: str, now: int) -> int:
        return int(
            self._run("clear_worker", [self.worker_index_key(worker_id)], [self.key_prefix, worker_id])
        )

    def _delete(self, sid: str, owner: str, now: int) -> bool:
        keys = [*self.session_keys(sid), self.owner_index_key(owner)]
        return bool(self._run("delete", keys, [self.key_prefix, sid, owner]))

    def _list(self, owner: str, now: int) -> list[Session]:
        rows = self._run("list", [self.owner_index_key(owner)], [self.key_prefix, now])
        return [self._session(sid.decode(), summary) for sid, summary in rows]
