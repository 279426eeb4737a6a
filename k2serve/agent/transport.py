"""Transport: how an agent talks to a k2serve router (the contract), and what one turn returns.

Two implementations with the same behaviour: `HTTPTransport` (the `openai` client against the
OpenAI-compatible API, `session_id` in `extra_body`) and `GRPCTransport` (the generated
`K2ServeStub`, the API key as `authorization: Bearer` metadata).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Message", "SamplingOptions", "Transport", "Turn", "assistant_message"]

Message = dict[str, Any]  # an OpenAI chat message: role, content, tool_calls, tool_call_id, ...


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling for every turn; None leaves the server's default. `logprobs` asks the server for the
    sampled tokens' logprobs, which also makes it stream a chunk per token (so over HTTP
    `Turn.ttft_s` is the time to the first token even when the reply starts with a tool call)."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class Turn:
    """One model turn as the client saw it.

    message: the assistant message as the server recorded it in the session (`assistant_message`). finish_reason: "stop", "tool_calls" or
    "length". prompt_tokens / cached_tokens / completion_tokens: the server's usage (cached: prompt
    tokens served from a KV cache, so prompt - cached were computed for this turn). ttft_s: seconds
    from sending the request to the first streamed output: over gRPC the first response (the server
    sends one per token event); over HTTP the first chunk with content, reasoning, a tool-call delta
    or a logprob (the server streams no chunk for tokens inside a tool call's header unless
    logprobs are on). latency_s: to the end of the stream.
    """

    message: Message
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    latency_s: float
    tool_calls: tuple[Mapping[str, Any], ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tool_calls", tuple(self.message.get("tool_calls") or ()))


def assistant_message(content: str, reasoning: str, tool_calls: Sequence[Mapping[str, Any]]) -> Message:
    """A reply as the server records it in the session: content only when non-empty or when there
    are no tool calls, reasoning_content only when non-empty, tool_calls only when there are some."""
    message: Message = {"role": "assistant"}
    if content or not tool_calls:
        message["content"] = content
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = [dict(c) for c in tool_calls]
    return message


class Transport(ABC):
    """A connection to one k2serve router on behalf of one API key.

    Contract: `chat` sends only the turn's new messages with `session_id`; the server prepends the
    session's history and, once the turn finishes ("stop" or "length"), appends the new messages and
    the reply in one step, so the session never holds half a turn. A turn cut short by the client
    (or a dead client) records nothing. Every method raises `TransportError` when the server
    refuses or cannot be reached.
    """

    @abstractmethod
    def create_session(self, messages: Sequence[Message], ttl_seconds: int | None, model: str | None) -> str:
        """Create a session holding `messages` (e.g. the system prompt); returns its id."""

    @abstractmethod
    def session_messages(self, session_id: str) -> list[Message]:
        """The session's messages, oldest first."""

    @abstractmethod
    def chat(
        self,
        session_id: str | None,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]],
        tool_choice: str,
        sampling: SamplingOptions,
        model: str | None,
    ) -> Turn:
        """Run one turn of the session with these new messages (at least one), streamed; with
        `session_id` None, a stateless turn whose `messages` are the whole conversation."""

    @abstractmethod
    def delete_session(self, session_id: str) -> bool:
        """Delete the session; False when it did not exist."""
