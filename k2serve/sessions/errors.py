"""Typed errors of the session store; each carries the offending value.

The router maps them to API status codes: SessionNotFound -> NOT_FOUND, InvalidSessionId and
InvalidSessionArgument -> INVALID_ARGUMENT, SessionLimitError -> RESOURCE_EXHAUSTED or
INVALID_ARGUMENT, SessionConflict -> ABORTED, SessionStoreUnavailable -> UNAVAILABLE.
SessionStoreRefused (bad Redis password or TLS) stops the router at startup.
"""

from __future__ import annotations

__all__ = [
    "InvalidSessionArgument",
    "InvalidSessionId",
    "SessionConflict",
    "SessionError",
    "SessionLimitError",
    "SessionNotFound",
    "SessionStoreRefused",
    "SessionStoreUnavailable",
]


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SessionError(Exception):
    """Base of every error the session store raises on purpose."""


class InvalidSessionId(SessionError, ValueError):
    """`session_id` is not of the form the store generates (checked before any lookup)."""

    def __init__(self, session_id: object) -> None:
        self.session_id = session_id
        super().__init__(f"invalid session id {_short(session_id)}")


class SessionNotFound(SessionError):
    """No live session with this id for this owner: unknown, expired, deleted, or another
    owner's (one error for all, so a caller cannot learn that someone else's id exists)."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        super().__init__(f"session {session_id!r} not found")


class InvalidSessionArgument(SessionError, ValueError):
    """An argument (or config field) `name` has a value of the wrong type or outside its domain."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        self.name = name
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {name} {_short(value)}: {reason}")


class SessionLimitError(SessionError):
    """A configured limit would be exceeded: `value` is what the operation would make the
    limited quantity, `maximum` the limit (named after the config field, e.g. "max_tokens")."""

    def __init__(self, limit: str, value: int, maximum: int) -> None:
        self.limit = limit
        self.value = value
        self.maximum = maximum
        super().__init__(f"{limit} exceeded: {value} > {maximum}")


class SessionConflict(SessionError):
    """An append's `expected_num_tokens` did not match the session's history length, or the
    append lost the race to concurrent appends too many times in a row."""

    def __init__(self, session_id: str, expected_num_tokens: int | None, actual_num_tokens: int) -> None:
        self.session_id = session_id
        self.expected_num_tokens = expected_num_tokens
        self.actual_num_tokens = actual_num_tokens
        super().__init__(
            f"session {session_id!r} has {actual_num_tokens} tokens, expected {expected_num_tokens}"
            if expected_num_tokens is not None
            else f"session {session_id!r}: too many concurrent appends, gave up at {actual_num_tokens} tokens"
        )


class SessionStoreUnavailable(SessionError):
    """The backing store (Redis) could not be reached; the operation may or may not have applied
    (append is idempotent across redis-py's own retries, not across calls)."""

    def __init__(self, where: str, cause: BaseException) -> None:
        self.where = where
        self.cause = cause
        super().__init__(f"session store at {where} unavailable: {cause}")


class SessionStoreRefused(SessionError, ValueError):
    """Redis answered but refused this process: wrong or missing password, or a TLS handshake that
    failed (certificate not trusted, client certificate missing or refused). A configuration error,
    raised at startup (`RedisSessionStore.check`); `reason` says which."""

    def __init__(self, where: str, reason: str, cause: BaseException) -> None:
        self.where = where
        self.reason = reason
        self.cause = cause
        super().__init__(f"Redis at {where}: {reason} ({cause})")
