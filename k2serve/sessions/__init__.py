"""Agent sessions: the store of each session's token/message history and routing bookkeeping.

`SessionStore` is the interface (contract in its docstring); `RedisSessionStore` is the shared,
durable one and `InMemorySessionStore` the single-process reference it is tested against.
"""

from k2serve.sessions.connection import RedisConnection
from k2serve.sessions.errors import (
    InvalidSessionArgument,
    InvalidSessionId,
    SessionConflict,
    SessionError,
    SessionLimitError,
    SessionNotFound,
    SessionStoreRefused,
    SessionStoreUnavailable,
)
from k2serve.sessions.memory import InMemorySessionStore
from k2serve.sessions.redis_store import RedisSessionStore
from k2serve.sessions.session import Session, SessionHistory, SessionHolder, SessionStoreConfig
from k2serve.sessions.store import SessionStore

__all__ = [
    "InMemorySessionStore",
    "InvalidSessionArgument",
    "InvalidSessionId",
    "RedisConnection",
    "RedisSessionStore",
    "Session",
    "SessionConflict",
    "SessionError",
    "SessionHistory",
    "SessionHolder",
    "SessionLimitError",
    "SessionNotFound",
    "SessionStore",
    "SessionStoreConfig",
    "SessionStoreRefused",
    "SessionStoreUnavailable",
]
