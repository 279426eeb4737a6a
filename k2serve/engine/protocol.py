"""The serving contract: what every front door (the HTTP API, the public gRPC API, the router, the
workers) asks of whatever generates tokens: request/event types, errors, the backend protocol.

Everything here is transport-neutral: a `GenerateRequest` holds token ids, `SamplingParams` and a
JSON-serialisable structured-output spec (never a compiled grammar), so a remote worker can rebuild
it; a `TokenEvent` holds token ids (text is made by the front door from the tokenizer).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from k2serve.chat.tokenizer import KimiTokenizer
from k2serve.engine.sampler import TokenLogprobs
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.sequence import RequestError

__all__ = [
    "BackendError",
    "BackendFailure",
    "BackendStats",
    "DrainingError",
    "FINISH_REASONS",
    "GenerateRequest",
    "GenerationBackend",
    "InvalidRequestError",
    "QueueFullError",
    "TokenEvent",
    "TokenLogprobs",
    "UnavailableError",
]

FINISH_REASONS = ("stop", "length", "abort")  # the values of TokenEvent.finish_reason


@dataclass(frozen=True)
class GenerateRequest:
    """One generation. `request_id` is unique among the backend's in-flight requests.

    `structured` is None or exactly one of `{"response_format": <OpenAI response_format>}` or
    `{"tools": [<OpenAI tool>...], "tool_choice": "required" | "auto" | {"type": "function", "function":
    {"name": N}}}`, optionally with `"allow_reasoning": bool` (an optional `<think>` block may precede
    the constrained output; default False) and `"parallel_tool_calls": false` (one call at most). The backend compiles it with
    `k2serve.chat.structured.GrammarCompiler` against its own tokenizer.

    `session` (agent sessions): the session this turn belongs to and where its prefix is cached; a
    backend may route by it (the cluster sends the turn to the holder) and reports the new holder.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    structured: dict[str, Any] | None = None
    session: SessionHint | None = None


@dataclass(frozen=True)
class SessionHint:
    """session_id; holder: the worker that last served the session (None: unknown); cached_tokens: how
    many leading tokens of the session's context that worker cached."""

    session_id: str
    holder: str | None = None
    cached_tokens: int = 0


@dataclass(frozen=True)
class TokenEvent:
    """New tokens of one request, in order. The last event of a stream has `finish_reason` set
    ("stop", "length" or "abort") and may carry no tokens. `num_prompt_tokens` and
    `num_cached_tokens` (prompt tokens served by the prefix cache) are the same in every event.
    `logprobs` is None unless the request asked for them; then it has one entry per token id.
    `served_by`: on the last event, the worker that now caches the request's context (cluster only)."""

    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[TokenLogprobs] | None = None
    served_by: str | None = None


@dataclass(frozen=True)
class KVTierStats:
    """The local KV tiers and session leases of an engine, counted since start (per tier: "host",
    "disk", and "mooncake" with the shared store): prefix-hit tokens reloaded from the tier, bytes and
    seconds of offloads into it and reloads out of it, blocks it holds now (local tiers); entries
    dropped as corrupt or missing; blocks leased now; failed or timed-out shared store calls; the
    asynchronous offload / reload queues."""

    hit_tokens: dict[str, int]
    offload_bytes: dict[str, int]
    offload_seconds: dict[str, float]
    reload_bytes: dict[str, int]
    reload_seconds: dict[str, float]
    blocks: dict[str, int]
    corrupt_blocks: int = 0
    leased_blocks: int = 0
    store_errors: int = 0
    dropped_offloads: int = 0  # offloads dropped because the disk writer's queue was full
    write_queue_blocks: int = 0  # disk writes queued now
    reloads_in_flight: int = 0  # requests waiting for their asynchronous reload now
    reload_timeouts: int = 0  # asynchronous reloads given up (recomputed) since start

    @property
    def reload_tokens_per_s(self) -> dict[str, float]:
        """Measured reload speed per tier that has reloaded anything: hit tokens per second of reading
        and copying them back (what the router's predicted TTFT charges a block held there)."""
        return {
            t: n / self.reload_seconds[t]
            for t, n in self.hit_tokens.items()
            if n and self.reload_seconds.get(t)
        }


@dataclass(frozen=True)
class BackendStats:
    """A snapshot for metrics and load balancing. kv blocks are counts of blocks, summed over the
    backend's pools; prefix_hit_rate is cached prompt tokens / prompt tokens looked up, in [0, 1]
    (prefix_hit_tokens / prefix_query_tokens, both counted since start)."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_hit_rate: float
    num_preemptions: int
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    spec_num_drafts: int = 0  # speculative decoding: rows that verified drafts (since start)
    spec_num_draft_tokens: int = 0  # draft tokens verified
    spec_num_accepted_tokens: int = 0  # draft tokens accepted
    queued_prefill_tokens: int = 0  # prompt tokens still to compute (LLMEngine.queued_prefill_tokens)
    prefill_tokens_per_s: float = 0.0  # measured prefill speed (EWMA); 0.0 before the first prefill step
    prompts_computed: int = (
        0  # requests whose prompt was computed here (since start; same snapshot as the queue)
    )
    decode_step_ms: float = 0.0  # measured decode-only step time (EWMA, ms); 0.0 before the first one
    decode_step_batch: float = 0.0  # the sequences of those steps (EWMA)
    kv_tiers: KVTierStats | None = None  # None: no tiers and no leases configured


class BackendError(Exception):
    """Base of the errors a backend raises to one caller (never for other requests)."""


class InvalidRequestError(BackendError, RequestError):
    """The request can never run as given (a RequestError: the offline engine raises it too). `param`
    names the offending request field (the name in SamplingParams or GenerateRequest: "max_tokens",
    "prompt_token_ids", "response_format", ...) and `value` is its value. `limit` is set when a size
    limit was exceeded (e.g. max_model_len)."""

    def __init__(
        self, message: str, param: str | None = None, value: object = None, limit: int | None = None
    ) -> None:
        super().__init__(message)
        self.param = param
        self.value = value
        self.limit = limit


class QueueFullError(BackendError):
    """Admission refused: `num_waiting` requests already wait and the limit is `limit`.
    Retrying after `retry_after_s` seconds is reasonable."""

    def __init__(self, num_waiting: int, limit: int, retry_after_s: float = 1.0) -> None:
        super().__init__(f"the queue is full: {num_waiting} requests waiting, limit {limit}")
        self.num_waiting = num_waiting
        self.limit = limit
        self.retry_after_s = retry_after_s


class DrainingError(BackendError):
    """Admission refused: the backend is draining (finishing in-flight requests before stopping)."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down and accepts no new requests")


class UnavailableError(BackendError):
    """Nothing can serve the request now (a cluster with no ready worker of a role it needs); `missing`
    names what lacks, e.g. ["decode worker"]. Retrying after `retry_after_s` seconds is reasonable
    (HTTP 503 with Retry-After, gRPC UNAVAILABLE)."""

    def __init__(self, missing: list[str], request_id: str = "", retry_after_s: float = 2.0) -> None:
        what = " and ".join(f"no ready {m}" for m in missing) or "no worker can take it"
        super().__init__(f"request {request_id!r} cannot be served now: {what}; retry shortly")
        self.missing = missing
        self.request_id = request_id
        self.retry_after_s = retry_after_s


class BackendFailure(BackendError):
    """An in-flight request was ended by a failure that is not the request's fault (the HTTP
    layer answers 500); `request_id` names it."""

    def __init__(self, message: str, request_id: str) -> None:
        super().__init__(f"request {request_id!r}: {message}")
        self.request_id = request_id


@runtime_checkable
class GenerationBackend(Protocol):
    """The contract between the front doors and token generation.

    Implementations: `k2serve.engine.async_engine.AsyncEngine` (one local engine) and the
    cluster router's `ClusterBackend` (prefill/decode workers). The HTTP and gRPC APIs use nothing else.

    - `check_admission()` raises DrainingError or QueueFullError when a new request would be
      refused now; it is cheap and does no work (the app calls it before tokenizing).
    - `await generate(request)` validates and admits the request, raising InvalidRequestError,
      QueueFullError or DrainingError before any work is done; it returns the request's event
      stream. Iterating it yields TokenEvents until one with `finish_reason`; it may raise
      BackendFailure instead. Requests that fail never affect other requests.
    - A caller that stops iterating before the final event must call `abort(request_id)`;
      `abort` is idempotent, a no-op for finished or unknown ids, and frees the request's KV blocks.
    - `stats()` never blocks on generation.
    - `tokenizer` is the one prompts were encoded with; `vocab_size` bounds token ids;
      `max_model_len` bounds prompt + generated tokens.
    """

    @property
    def model_name(self) -> str: ...

    @property
    def tokenizer(self) -> KimiTokenizer: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def check_admission(self) -> None: ...

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> BackendStats: ...
