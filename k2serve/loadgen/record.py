"""`RequestRecord`: what a client measured for one request (times in seconds from the run start)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    """One request's measurements.

    start_s / finish_s: when it was sent / ended (response done, failed or timed out). first_token_s:
    when the first output token arrived. chunk_s: arrival of every streamed chunk that carried output
    tokens (ITL is the gap between successive ones; a chunk can carry several tokens). output_tokens,
    prompt_tokens and cached_tokens come from the server's usage (None when it sent none).
    error: None on success, else the HTTP status ("500"), gRPC code ("UNAVAILABLE") or failure kind
    ("timeout", "connect_error", "stream_error:<code>", ...); rejected: refused for load (429 /
    RESOURCE_EXHAUSTED). best_cached_tokens: what an infinite prefix cache would hold (trace requests).
    Tool-loop runs (`--agent-turns`): `conversation` and `turn` (from 0) place the request, `tool_calls`
    counts the complete tool calls of its reply and `body_bytes` is the size of the JSON body sent.
    """

    index: int
    start_s: float
    prompt_len: int
    requested_output_len: int
    best_cached_tokens: int = 0
    finish_s: float | None = None
    first_token_s: float | None = None
    chunk_s: list[float] = field(default_factory=list)
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = None
    rejected: bool = False
    error_detail: str = ""
    conversation: int | None = None
    turn: int | None = None
    tool_calls: int | None = None
    body_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_s is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.start_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: (finish - first token) / (output tokens - 1);
        None for fewer than 2 tokens."""
        if not self.ok or self.first_token_s is None or not self.output_tokens or self.output_tokens < 2:
            return None
        assert self.finish_s is not None
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        """Gaps between successive chunks carrying output tokens (seconds)."""
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:], strict=False)]

    def to_json(self) -> dict:
        """The record without its chunk times, in ms relative to the run start."""

        def ms(x: float | None) -> float | None:
            return None if x is None else round(x * 1e3, 3)

        return {
            "index": self.index,
            "start_ms": ms(self.start_s),
            "ttft_ms": ms(self.ttft_s),
            "tpot_ms": ms(self.tpot_s),
            "e2e_ms": ms(self.e2e_s),
            "prompt_len": self.prompt_len,
            "requested_output_len": self.requested_output_len,
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "best_cached_tokens": self.best_cached_tokens,
            "num_chunks": len(self.chunk_s),
            "error": self.error,
            "rejected": self.rejected,
            "error_detail": self.error_detail,
            **(
                {}
                if self.turn is None
                else {
                    "conversation": self.conversation,
                    "turn": self.turn,
                    "tool_calls": self.tool_calls,
                    "body_bytes": self.body_bytes,
                }
            ),
        }
