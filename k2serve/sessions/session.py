"""What a session store holds and returns: its limits, a session's summary, and its history."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from k2serve.sessions.codec import unpack_tokens
from k2serve.sessions.errors import InvalidSessionArgument

__all__ = ["Session", "SessionHistory", "SessionHolder", "SessionStoreConfig"]


@dataclass(frozen=True)
class SessionStoreConfig:
    """Limits and sizes shared by every store implementation.

    block_size: tokens per KV block for the stored block-hash chain; must equal the workers'
    `EngineConfig.block_size` or the hashes will not match theirs. max_tokens: history length
    (tokens) a session may reach (K2's context). max_append_tokens / max_append_bytes: tokens /
    UTF-8 bytes of messages JSON in one append. max_messages_bytes: messages JSON a session may
    accumulate. max_sessions_per_owner: live sessions per API key. default_ttl_s / max_ttl_s:
    idle lifetime (seconds) when create() gets none / at most. max_metadata_bytes: the metadata
    dict as JSON.
    """

    block_size: int = 16
    max_tokens: int = 262_144
    max_append_tokens: int = 131_072
    max_append_bytes: int = 4 << 20
    max_messages_bytes: int = 16 << 20
    max_sessions_per_owner: int = 1024
    default_ttl_s: int = 3600
    max_ttl_s: int = 7 * 86_400
    max_metadata_bytes: int = 4096

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if type(value) is not int or value < 1:
                raise InvalidSessionArgument(name, value, "must be an int >= 1")
        if self.default_ttl_s > self.max_ttl_s:
            raise InvalidSessionArgument("default_ttl_s", self.default_ttl_s, "must be <= max_ttl_s")


@dataclass(frozen=True)
class SessionHolder:
    """The decode worker that holds the session's prefix in its KV cache, and how many tokens of
    the history (from the start) that prefix covers."""

    worker_id: str
    cached_tokens: int


@dataclass(frozen=True)
class Session:
    """A snapshot of a session's bookkeeping (not its history; see `SessionHistory`).

    owner_hash: hex SHA-256 of the owner's API key. Times are unix milliseconds; the session
    expires `ttl_s` seconds after `last_used_ms`. num_blocks: full blocks in the history (the
    length of its block-hash chain). turn_count: messages with role "user" appended so far;
    tool_step_count: the sum of `tool_steps` over all appends. holder: None when no worker is
    known to hold the prefix.
    """

    id: str
    owner_hash: str
    model: str
    metadata: Mapping[str, str]
    ttl_s: int
    created_ms: int
    last_used_ms: int
    num_tokens: int
    num_blocks: int
    num_messages: int
    turn_count: int
    tool_step_count: int
    holder: SessionHolder | None

    @property
    def expires_at_ms(self) -> int:
        return self.last_used_ms + 1000 * self.ttl_s


@dataclass(frozen=True)
class SessionHistory:
    """Everything needed to rebuild a session's context.

    packed_tokens: the token ids (prompt and generated, in order) as little-endian uint32.
    block_hashes: `chain_hashes(token_ids, block_size)`: one per full block. messages: the
    OpenAI-style messages appended so far, in order, as parsed JSON.
    """

    session: Session
    block_size: int
    packed_tokens: bytes
    block_hashes: tuple[int, ...]
    messages: tuple[dict[str, Any], ...]

    @property
    def token_ids(self) -> list[int]:
        return unpack_tokens(self.packed_tokens)
