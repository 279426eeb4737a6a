"""The client interface the run loop drives, and the SSE line parser of the HTTP client."""

from __future__ import annotations

import json
import time
from typing import Any

from k2serve.loadgen.dataset import BenchRequest
from k2serve.loadgen.record import RequestRecord


class Client:
    """Sends one request and measures it.

    Contract: `send(req, t0)` returns a finished RequestRecord (times in seconds from `t0`, a
    `time.perf_counter()` value) and does not raise for a failed request: the record's `error` names
    the failure. It raises only when cancelled (the run loop then records the request as cancelled).
    Every request ends within `timeout_s`. `aclose()` releases connections. `send_all(req, t0)` is what
    the run loop calls: the records of everything `req` stands for (one request; a whole conversation
    for the tool-loop client, whose turns each end within `timeout_s`).
    """

    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"request timeout must be > 0 s, got {timeout_s}")
        self.timeout_s = timeout_s

    async def send(self, req: BenchRequest, t0: float) -> RequestRecord:
        raise NotImplementedError

    async def send_all(self, req: BenchRequest, t0: float) -> list[RequestRecord]:
        return [await self.send(req, t0)]

    @property
    def span_timeout_s(self) -> float:
        """How long one `send_all` may take at most (the run loop's drain waits that long)."""
        return self.timeout_s

    async def aclose(self) -> None:
        return None

    @staticmethod
    def new_record(req: BenchRequest, t0: float) -> RequestRecord:
        return RequestRecord(
            req.index, time.perf_counter() - t0, len(req.prompt), req.output_len, req.best_cached_tokens
        )


class SSEFormatError(ValueError):
    """A `data:` line whose payload is not a JSON object; `line` is it."""

    def __init__(self, line: str) -> None:
        super().__init__(f"SSE data is not a JSON object: {line[:200]!r}")
        self.line = line


SSE_DONE = "[DONE]"


def parse_sse_line(line: str) -> dict[str, Any] | str | None:
    """One line of an SSE body: the JSON object of a `data:` line, SSE_DONE for `data: [DONE]`, None for
    blank lines, comments and other fields (event:, id:, retry:)."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == SSE_DONE:
        return SSE_DONE
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError as e:
        raise SSEFormatError(line) from e
    if not isinstance(obj, dict):
        raise SSEFormatError(line)
    return obj
