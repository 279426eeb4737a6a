"""The HTTP clients against a scripted test server (a Starlette app whose /v1/completions and /v1/messages
stream a fixed script per model name): SSE timing, usage, and every failure kind the clients record."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from k2serve.loadgen.chat_client import ChatClient
from k2serve.loadgen.dataset import BenchRequest
from k2serve.loadgen.http_client import HTTPClient
from k2serve.loadgen.record import RequestRecord
from k2serve.testing.app_server import serve_in_thread

pytestmark = pytest.mark.timeout(60)
BODIES: list[dict] = []
AUTH: list[str | None] = []


def data(obj: object) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def chunk(text: str) -> str:
    return data({"choices": [{"index": 0, "text": text, "finish_reason": None}], "usage": None})


USAGE = data({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2}}})  # fmt: skip
SCRIPTS: dict[str, list[str]] = {
    "ok": [": comment\n\n", chunk("a"), chunk("b"), chunk("c"), USAGE, "data: [DONE]\n\n"],
    "midfail": [chunk("a"), data({"error": {"message": "boom", "type": "internal_error", "code": "backend_failure"}}),
                "data: [DONE]\n\n"],
    "cut": [chunk("a"), chunk("b")],
    "nousage": [chunk("a"), chunk("b"), "data: [DONE]\n\n"],
    "garbage": [chunk("a"), "data: {nope\n\n"],
}  # fmt: skip


async def completions(request: Request) -> Response:
    body = await request.json()
    BODIES.append(body)
    AUTH.append(request.headers.get("authorization"))
    model = body.get("model")
    if model == "busy":
        return JSONResponse({"error": {"message": "queue full", "code": "queue_full"}}, status_code=429)
    if model == "bad":
        return JSONResponse({"error": {"message": "no such model"}}, status_code=404)

    async def stream() -> AsyncIterator[str]:
        if model == "slow":
            await asyncio.sleep(5)
        for part in SCRIPTS[model]:
            await asyncio.sleep(0.01)
            yield part

    return StreamingResponse(stream(), media_type="text/event-stream")


def event(kind: str, obj: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **obj})}\n\n"


MESSAGE_START = event(
    "message_start", {"message": {"usage": {"input_tokens": 9, "cache_read_input_tokens": 0}}}
)
DELTA = event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "hi"}})
MESSAGES: dict[str, list[str]] = {
    "overloaded": [MESSAGE_START, DELTA, event("error", {"error": {"type": "overloaded_error", "message": "busy"}})],
    "cut": [MESSAGE_START, DELTA],
    "slow": [MESSAGE_START, DELTA],
}  # fmt: skip


async def messages(request: Request) -> Response:
    """Anthropic's /v1/messages, scripted per model name ("slow": nothing for 5 s)."""
    model = (await request.json())["model"]

    async def stream() -> AsyncIterator[str]:
        if model == "slow":
            await asyncio.sleep(5)
        for part in MESSAGES[model]:
            yield part

    return StreamingResponse(stream(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
    ]
    with serve_in_thread(Starlette(routes=routes)) as base:
        yield base


def send(url: str, model: str, timeout_s: float = 10.0, api_key: str | None = None) -> RequestRecord:
    async def go() -> RequestRecord:
        client = HTTPClient(url, model, api_key, timeout_s)
        try:
            return await client.send(BenchRequest(0, (5, 6, 7), 3), 0.0)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_stream_is_timed_chunk_by_chunk_with_usage(url: str) -> None:
    BODIES.clear()
    AUTH.clear()
    r = send(url, "ok", api_key="k")
    assert AUTH == ["Bearer k"]
    assert r.ok and r.error is None and len(r.chunk_s) == 3 and r.first_token_s == r.chunk_s[0]
    assert all(g >= 0.005 for g in r.itl_s)  # the script sleeps 10 ms between parts
    assert (r.output_tokens, r.prompt_tokens, r.cached_tokens) == (3, 3, 2)
    assert r.tpot_s is not None and r.tpot_s > 0 and r.e2e_s is not None and r.e2e_s >= r.ttft_s  # type: ignore[operator]
    assert BODIES[0] == {
        "prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True}, "model": "ok",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("model", "error", "rejected", "detail"),
    [
        ("busy", "429", True, "queue full"),
        ("bad", "404", False, "no such model"),
        ("midfail", "stream_error:backend_failure", False, "boom"),
        ("cut", "incomplete_stream", False, "[DONE]"),
        ("garbage", "bad_stream", False, "not a JSON object"),
    ],
)
def test_failures_are_recorded_by_kind(url: str, model: str, error: str, rejected: bool, detail: str) -> None:
    r = send(url, model)
    assert (r.error, r.rejected, r.ok) == (error, rejected, False)
    assert detail in r.error_detail and r.finish_s is not None


def test_missing_usage_falls_back_to_chunks_and_timeouts_end_requests(url: str) -> None:
    r = send(url, "nousage")
    assert r.ok and r.output_tokens == 2 and r.cached_tokens is None
    slow = send(url, "slow", timeout_s=0.3)
    assert slow.error == "timeout" and slow.e2e_s is not None and slow.e2e_s < 2.0


def converse(url: str, model: str, timeout_s: float = 10.0) -> list[RequestRecord]:
    """A 3-turn tool-loop conversation on /v1/messages (ChatClient), its records."""

    async def go() -> list[RequestRecord]:
        client = ChatClient(url, "/v1/messages", model, None, timeout_s, agent_turns=3)
        try:
            return await client.send_all(BenchRequest(0, (), 8, text="hello"), 0.0)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_chat_client_failures_end_the_conversation(url: str) -> None:
    """An Anthropic error event is a rejection when the server is overloaded; a body without message_stop
    is incomplete; a turn past the timeout times out; each ends its conversation at that turn."""
    (over,) = converse(url, "overloaded")
    assert (over.error, over.rejected, over.turn, over.error_detail) == (
        "stream_error:overloaded_error",
        True,
        0,
        "busy",
    )
    assert over.first_token_s is not None and over.prompt_tokens == 9  # what came before the error counts
    (cut,) = converse(url, "cut")
    assert cut.error == "incomplete_stream" and not cut.rejected
    (slow,) = converse(url, "slow", timeout_s=0.3)
    assert slow.error == "timeout" and slow.e2e_s is not None and slow.e2e_s < 2.0
