"""Registering gRPC servicers so that undecodable requests get INVALID_ARGUMENT, not UNKNOWN.

gRPC decodes a request before the servicer runs; a DecodeError there becomes an opaque status. Here the
generated `add_XServicer_to_server` registers into a recorder, and every method handler is rebuilt with a
deserializer that never raises (it returns a marker on bad bytes) and a behaviour that answers the marker
with INVALID_ARGUMENT naming the method. Protobuf parsing never executes code; this only fixes the status.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class _Malformed:
    def __init__(self, error: str) -> None:
        self.error = error


def _safe_deserializer(fn: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if fn is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return fn(data)
        except (DecodeError, ValueError, RuntimeError) as e:
            return _Malformed(str(e) or type(e).__name__)

    return deserialize


def _guard(method: str, behavior: Callable[..., Any], streaming_response: bool) -> Callable[..., Any]:
    message = f"{method}: the request is not a valid protobuf message"
    if streaming_response:

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{message} ({request.error})")
            async for item in behavior(request, context):
                yield item

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{message} ({request.error})")
        return await behavior(request, context)

    return unary


class _Recorder:
    def __init__(self) -> None:
        self.handlers: list[tuple[str, dict[str, grpc.RpcMethodHandler]]] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:  # the generated code calls both
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers.append((service, handlers))


def add_servicer(server: grpc.aio.Server, add_fn: Callable[[Any, Any], None], servicer: Any) -> None:
    """`add_fn(servicer, server)` (a generated `add_XServicer_to_server`), with malformed requests refused."""
    rec = _Recorder()
    add_fn(servicer, rec)
    for service, handlers in rec.handlers:
        safe: dict[str, grpc.RpcMethodHandler] = {}
        for name, h in handlers.items():
            if h.request_streaming:
                safe[name] = h  # no client-streaming method takes untrusted structure beyond its messages
                continue
            des, ser = _safe_deserializer(h.request_deserializer), h.response_serializer
            behavior = h.unary_stream if h.response_streaming else h.unary_unary
            if behavior is None:
                raise ValueError(f"{service}/{name}: a unary-request method without its behavior")
            if h.response_streaming:
                safe[name] = grpc.unary_stream_rpc_method_handler(_guard(name, behavior, True), des, ser)
            else:
                safe[name] = grpc.unary_unary_rpc_method_handler(_guard(name, behavior, False), des, ser)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, safe),))
        server.add_registered_method_handlers(service, safe)
