"""Backend errors <-> gRPC status codes, both ways (workers answer with codes, the router maps them back)."""

from __future__ import annotations

import grpc

from k2serve.engine.protocol import (
    BackendError,
    BackendFailure,
    DrainingError,
    InvalidRequestError,
    QueueFullError,
    UnavailableError,
)


def status_of(err: BackendError) -> grpc.StatusCode:
    if isinstance(err, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(err, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(err, DrainingError | UnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def error_of(e: grpc.aio.AioRpcError, request_id: str, what: str) -> BackendError:
    """The BackendError a failed worker call becomes for the router's caller."""
    code, detail = e.code(), e.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(detail)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return QueueFullError(0, 0) if "queue" in detail else BackendFailure(f"{what}: {detail}", request_id)
    return BackendFailure(f"{what} failed ({code.name}): {detail}", request_id)
