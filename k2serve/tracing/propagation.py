"""W3C `traceparent` from a caller into this process: the router's front doors (an ASGI middleware for
HTTP, a gRPC server interceptor) put the incoming value in a context variable that the backend reads
(`incoming()`) when it opens the request's span; workers read their gRPC metadata (`of_call`). Installed
only when tracing is on."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import Any

import grpc
from starlette.types import ASGIApp, Receive, Scope, Send

HEADER = "traceparent"
MAX_CHARS = 128  # a version-00 value has 55; anything longer is ignored, never parsed
_INCOMING: ContextVar[str] = ContextVar("k2serve_incoming_traceparent", default="")


def incoming() -> str:
    """The traceparent the current request arrived with ("" when none)."""
    return _INCOMING.get()


def _pick(pairs: Iterable[tuple[Any, Any]] | None) -> str:
    for key, value in pairs or ():
        if key == HEADER:
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            return text if len(text) <= MAX_CHARS else ""
    return ""


def of_call(context: grpc.aio.ServicerContext) -> str:
    """The traceparent of a gRPC call's metadata ("" when none)."""
    return _pick(context.invocation_metadata())


class TraceparentMiddleware:
    """ASGI middleware: an HTTP request's `traceparent` header becomes `incoming()` while it is served."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            value = _pick([(HEADER, v) for k, v in scope["headers"] if k == b"traceparent"])
            if value:
                _INCOMING.set(value)  # this request's task (and the tasks it starts) only
        await self.app(scope, receive, send)


class TraceparentInterceptor(grpc.aio.ServerInterceptor):
    """gRPC server interceptor: a call's `traceparent` metadata becomes `incoming()` in its handler."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        value = _pick(handler_call_details.invocation_metadata)
        if handler is None or not value:
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_with(value, handler.unary_unary))  # type: ignore[attr-defined]
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_with(value, handler.unary_stream))  # type: ignore[attr-defined]
        return handler


def _with(value: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    """behavior (a coroutine or async-generator function) run with `incoming()` == value."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            _INCOMING.set(value)
            async for item in behavior(request, context):
                yield item

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _INCOMING.set(value)
        return await behavior(request, context)

    return unary
