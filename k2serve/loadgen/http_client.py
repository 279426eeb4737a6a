"""HTTPClient: streamed token-id /v1/completions over httpx, timed chunk by chunk; its SSE plumbing
(`post_stream`, `guarded`) is shared with the chat-dialect client (`chat_client.py`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx

from k2serve.loadgen.client import SSE_DONE, Client, SSEFormatError, parse_sse_line
from k2serve.loadgen.dataset import BenchRequest
from k2serve.loadgen.record import RequestRecord

T = TypeVar("T")
# Called with each JSON event of a stream and its arrival (s from t0); True when the event ends the stream.
OnEvent = Callable[[dict[str, Any], float], bool]


class HTTPClient(Client):
    """Posts each request to `{url}/v1/completions` (token-id prompt, `max_tokens` = output_len,
    `ignore_eos`, `stream` with usage) and to no other address. A chunk with choices marks output
    tokens; the final usage chunk gives output, prompt and cached tokens."""

    def __init__(
        self,
        url: str,
        model: str | None,
        api_key: str | None,
        timeout_s: float,
        temperature: float = 0.0,
        max_connections: int | None = None,
    ) -> None:
        super().__init__(timeout_s)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            trust_env=False,  # no proxy: the URL given is the only address contacted
        )
        self._model = model
        self._temperature = temperature

    def body(self, req: BenchRequest) -> dict:
        body: dict = {
            "prompt": list(req.prompt),
            "max_tokens": req.output_len,
            "ignore_eos": True,
            "temperature": self._temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self._model is not None:
            body["model"] = self._model
        return body

    async def send(self, req: BenchRequest, t0: float) -> RequestRecord:
        rec = self.new_record(req, t0)
        await self.guarded(rec, t0, self._stream(req, rec, t0))
        return rec

    async def guarded(self, rec: RequestRecord, t0: float, work: Awaitable[T]) -> T | None:
        """Await `work` within the timeout, recording a failure in `rec` instead of raising; sets finish_s.
        What `work` returned, None when it failed."""
        out: T | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                out = await work
        except TimeoutError:
            rec.error, rec.error_detail = "timeout", f"no end within {self.timeout_s} s"
        except httpx.TimeoutException as e:
            rec.error, rec.error_detail = "timeout", f"{type(e).__name__}: {e}"
        except httpx.ConnectError as e:
            rec.error, rec.error_detail = "connect_error", str(e)
        except httpx.HTTPError as e:
            rec.error, rec.error_detail = type(e).__name__, str(e)
        except SSEFormatError as e:
            rec.error, rec.error_detail = "bad_stream", str(e)
        rec.finish_s = time.perf_counter() - t0
        return out

    async def post_stream(
        self, path: str, body: dict[str, Any] | bytes, rec: RequestRecord, t0: float, on_event: OnEvent
    ) -> bool:
        """POST `body` to `path` and feed the stream's JSON events to `on_event`. False, with the failure
        in `rec`, on a non-200 status, an error event (OpenAI's `{"error": ...}` or Anthropic's
        `{"type": "error"}`) or a body that ends before `data: [DONE]` or an event `on_event` calls final.
        `body` is JSON, or bytes of JSON already encoded."""
        sent: dict[str, Any] = (
            {"content": body, "headers": {"Content-Type": "application/json"}}
            if isinstance(body, bytes)
            else {"json": body}
        )
        async with self._http.stream("POST", path, **sent) as resp:
            if resp.status_code != 200:
                rec.error = str(resp.status_code)
                rec.rejected = resp.status_code == 429
                rec.error_detail = (await resp.aread()).decode("utf-8", errors="replace")[:500]
                return False
            async for line in resp.aiter_lines():
                now = time.perf_counter() - t0
                event = parse_sse_line(line)
                if event is None:
                    continue
                if event == SSE_DONE:
                    return True
                assert isinstance(event, dict)
                if "error" in event:
                    err = event["error"] if isinstance(event["error"], dict) else {}
                    code = err.get("code") or err.get("type") or "unknown"
                    rec.error = f"stream_error:{code}"
                    rec.rejected = code in ("queue_full", "overloaded_error", "rate_limit_error")
                    rec.error_detail = str(err.get("message", event))[:500]
                    return False
                if on_event(event, now):
                    return True
        rec.error = "incomplete_stream"
        rec.error_detail = "the body ended without data: [DONE] or the stream's last event"
        return False

    async def _stream(self, req: BenchRequest, rec: RequestRecord, t0: float) -> None:
        def on_event(event: dict[str, Any], now: float) -> bool:
            if event.get("choices"):
                if rec.first_token_s is None:
                    rec.first_token_s = now
                rec.chunk_s.append(now)
            usage = event.get("usage")
            if usage:
                rec.output_tokens = usage.get("completion_tokens")
                rec.prompt_tokens = usage.get("prompt_tokens")
                rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            return False

        done = await self.post_stream("/v1/completions", self.body(req), rec, t0, on_event)
        if done and rec.output_tokens is None:
            rec.output_tokens = len(rec.chunk_s)  # no usage sent: chunks are the best count there is

    async def aclose(self) -> None:
        await self._http.aclose()
