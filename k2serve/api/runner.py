"""Plumbing every generation endpoint shares: app state, starting a backend request with its errors
mapped to HTTP, event iteration that always aborts an unfinished request, SSE, client disconnects."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from k2serve.api.errors import APIError, from_backend_error
from k2serve.api.metrics import APIMetrics, RequestTracker
from k2serve.api.thinking import ThinkingSigner
from k2serve.chat.prompt import PromptEncoder
from k2serve.engine.protocol import BackendError, GenerateRequest, GenerationBackend, TokenEvent

T = TypeVar("T")
DONE = "data: [DONE]\n\n"
CLIENT_CLOSED = 499  # nginx's status for "client closed the request" (metrics only)


@dataclass
class AppState:
    backend: GenerationBackend
    encoder: PromptEncoder
    metrics: APIMetrics
    api_key: str | None
    sessions: Any = None  # k2serve.sessions.service.SessionService when sessions are enabled
    # signs the Anthropic API's thinking blocks (key: $K2SERVE_THINKING_KEY, else random; see api/thinking.py)
    thinking_signer: ThinkingSigner = field(default_factory=lambda: ThinkingSigner.from_env(os.environ))

    def owner(self, request: Request) -> str:
        """The session owner: the API key the client presented (checked by the auth dependency)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else "anonymous"

    def check_model(self, model: str | None) -> str:
        """The served model name; 404 for any other name (None means the served model)."""
        name = self.backend.model_name
        if model is not None and model != name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{name}'.",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        return name

    def admit(self) -> None:
        """429 / 503 before any tokenizing when the backend would refuse a request now."""
        try:
            self.backend.check_admission()
        except BackendError as e:
            raise from_backend_error(e) from e


async def start(
    state: AppState, request: GenerateRequest, param_names: Mapping[str, str]
) -> AsyncIterator[TokenEvent]:
    """Submit `request`; backend refusals become APIErrors naming the request's own fields."""
    try:
        return await state.backend.generate(request)
    except BackendError as e:
        raise from_backend_error(e, param_names) from e


async def events(
    state: AppState, request_id: str, stream: AsyncIterator[TokenEvent], tracker: RequestTracker
) -> AsyncGenerator[TokenEvent, None]:
    """`stream`'s events, timed; when closed or cancelled before the final event, the request is
    aborted (shielded from the cancellation, so its KV blocks are always freed)."""
    finished = False
    try:
        async for ev in stream:
            tracker.tokens(len(ev.token_ids), ev.num_prompt_tokens, ev.num_cached_tokens)
            finished = ev.finish_reason is not None
            yield ev
    finally:
        if not finished:
            with anyio.CancelScope(shield=True):
                await state.backend.abort(request_id)


def sse(obj: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response whose body iterator is always closed when the response ends,
    including when the client disconnects, so the iterator's cleanup (abort) runs at once."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the request body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Run `work`; if the client disconnects first, cancel it (its cleanup aborts the generation).
    Returns (True, result) or (False, None)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return True, task.result()
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        return False, None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def merged(
    streams: Sequence[AsyncIterator[TokenEvent]],
) -> AsyncGenerator[tuple[int, TokenEvent], None]:
    """(stream index, event) from all streams as they come; closing this closes (aborts) them all. One
    stream is iterated directly."""
    if len(streams) == 1:
        async with aclosing(streams[0]):  # type: ignore[type-var]
            async for ev in streams[0]:
                yield 0, ev
        return
    queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[TokenEvent]) -> None:
        try:
            async with aclosing(s):  # type: ignore[type-var]
                async for ev in s:
                    await queue.put((i, ev))
            await queue.put((i, None))
        except BackendError as e:
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
