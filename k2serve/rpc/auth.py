"""Who may call a gRPC server: the API key on the public API, the cluster credential on internal ones.

Two credentials, never interchangeable:
- users: `authorization: Bearer <key>` metadata on the public `k2serve.v1.K2Serve` service, checked
  against the router's `--api-key` keys (comma-separated, as over HTTP); no keys: the API is open.
- the cluster: every internal call (worker registry, PrefillWorker, DecodeWorker, KVTransfer) carries
  the cluster token as `k2serve-cluster-token` metadata, and/or runs over mutual TLS (a client
  certificate signed by `--tls-ca`, verified by gRPC before any handler runs). `InternalAuth` says which
  a process has; it refuses to exist with neither unless `insecure=True` (`--insecure-internal`).

Servers check with one interceptor (`ServerAuth`, asyncio and thread-pool servers alike): a call that
fails the check gets UNAUTHENTICATED before its request is even parsed. Keys and tokens are compared
with `hmac.compare_digest` against every accepted value. The gRPC health service stays open
(probes carry no credentials). Clients attach the token with `InternalAuth.metadata()`, or with
`InternalAuth.client_interceptors()` on asyncio channels.
"""

from __future__ import annotations

import hmac
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

CLUSTER_TOKEN_HEADER = "k2serve-cluster-token"  # noqa: S105 - a metadata key, not a secret
PUBLIC_SERVICE = "k2serve.v1.K2Serve"
OPEN_SERVICES = ("grpc.health.v1.Health",)
MIN_TOKEN_CHARS = 16


class AuthConfigError(ValueError):
    """The cluster credential is missing or unusable; carries the offending value."""

    def __init__(self, message: str, value: object = None) -> None:
        super().__init__(message)
        self.value = value


def read_token_file(path: str) -> str:
    """The cluster token in `path` (surrounding whitespace stripped). AuthConfigError when the file is
    missing, readable by others than its owner (and group: Kubernetes mounts Secrets 0440 with an
    fsGroup), or holds fewer than MIN_TOKEN_CHARS characters."""
    p = Path(path)
    if not p.is_file():
        raise AuthConfigError(f"--cluster-token-file {path!r}: no such file", path)
    if p.stat().st_mode & stat.S_IROTH:
        raise AuthConfigError(f"--cluster-token-file {path!r}: readable by others (chmod 600 it)", path)
    token = p.read_text().strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise AuthConfigError(
            f"--cluster-token-file {path!r}: the token must have >= {MIN_TOKEN_CHARS} characters", path
        )
    return token


def write_token_file(path: str | Path, token: str) -> None:
    """Write `token` to `path`, created 0600 (readable by this user alone) before anything is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)


def _accepted(values: Sequence[str]) -> tuple[bytes, ...]:
    return tuple(v.encode() for v in values)


def matches(presented: str, accepted: tuple[bytes, ...]) -> bool:
    """Constant time in the presented value: it is compared with every accepted value."""
    got = presented.encode()
    return any([hmac.compare_digest(got, a) for a in accepted])


@dataclass(frozen=True)
class InternalAuth:
    """The cluster credential of one process: `token` (None: none) and whether its TLS is mutual
    (`mtls`: every internal server it runs requires a client certificate signed by the CA).

    Servers accept a call when it carries the token (with a token) or, without a token, when mTLS
    already verified the caller; `insecure` (only `--insecure-internal`, for tests and development)
    lets a process without either serve and dial unauthenticated."""

    token: str | None = None
    mtls: bool = False
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < MIN_TOKEN_CHARS:
            raise AuthConfigError(f"the cluster token must have >= {MIN_TOKEN_CHARS} characters")
        if self.token is None and not self.mtls and not self.insecure:
            raise AuthConfigError(
                "internal gRPC services need a cluster credential: --cluster-token-file FILE (or "
                "$K2SERVE_CLUSTER_TOKEN_FILE), or mutual TLS (--tls-cert/--tls-key/--tls-ca); "
                "--insecure-internal runs them unauthenticated (tests and development only)"
            )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every internal call sends (nothing without a token)."""
        return () if self.token is None else ((CLUSTER_TOKEN_HEADER, self.token),)

    def server_interceptors(self) -> list[Any]:
        """For grpc.aio.server(interceptors=...): the token check (none needed without a token)."""
        return [] if self.token is None else [ServerAuth.cluster(self.token, aio=True)]

    def thread_server_interceptors(self) -> list[Any]:
        """For grpc.server(interceptors=...) (the thread-pool KV transfer server)."""
        return [] if self.token is None else [ServerAuth.cluster(self.token, aio=False)]

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """For asyncio channels: adds `metadata()` to every call."""
        if self.token is None:
            return []
        pairs = self.metadata()
        return [_UnaryUnary(pairs), _UnaryStream(pairs), _StreamUnary(pairs), _StreamStream(pairs)]


class ServerAuth(grpc.aio.ServerInterceptor, grpc.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) calls to `services` (None: all but OPEN_SERVICES) whose `header`
    metadata, after `prefix`, is none of `accepted`. One class for asyncio and thread-pool servers."""

    def __init__(
        self,
        header: str,
        prefix: str,
        accepted: tuple[bytes, ...],
        services: tuple[str, ...] | None,
        message: str,
        aio: bool,
    ) -> None:
        self.header, self.prefix, self.accepted = header, prefix, accepted
        self.services, self.message, self.aio = services, message, aio

    @classmethod
    def api_keys(cls, api_key: str | None) -> list[ServerAuth]:
        """The public API's check (asyncio): none when no key is configured."""
        keys = [k.strip() for k in (api_key or "").split(",") if k.strip()]
        if not keys:
            return []
        message = "incorrect or missing API key: send 'authorization: Bearer <key>' metadata"
        return [cls("authorization", "bearer ", _accepted(keys), (PUBLIC_SERVICE,), message, aio=True)]

    @classmethod
    def cluster(cls, token: str, aio: bool) -> ServerAuth:
        message = f"internal service: missing or wrong cluster credential ({CLUSTER_TOKEN_HEADER})"
        return cls(CLUSTER_TOKEN_HEADER, "", _accepted([token]), None, message, aio)

    def allows(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        service = method.lstrip("/").partition("/")[0]
        if self.services is None:
            if service in OPEN_SERVICES:
                return True
        elif service not in self.services:
            return True
        for key, value in metadata or ():
            if key != self.header or not isinstance(value, str):
                continue
            if value[: len(self.prefix)].lower() == self.prefix and matches(
                value[len(self.prefix) :].strip(), self.accepted
            ):
                return True
        return False

    def _deny(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        code, message = grpc.StatusCode.UNAUTHENTICATED, self.message
        behavior: Callable[..., Any]
        if self.aio:

            async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
                await context.abort(code, message)

            behavior = refuse
        else:

            def refuse_sync(request: Any, context: grpc.ServicerContext) -> None:
                context.abort(code, message)

            behavior = refuse_sync
        # No deserializer: an unauthenticated request is never parsed.
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(behavior)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(behavior)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(behavior)
        return grpc.unary_unary_rpc_method_handler(behavior)

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        if self.aio:
            return self._intercept_aio(continuation, details)
        handler = continuation(details)
        if handler is None or self.allows(details.method, details.invocation_metadata):
            return handler
        return self._deny(handler)

    async def _intercept_aio(
        self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or self.allows(details.method, details.invocation_metadata):
            return handler
        return self._deny(handler)


class _AddMetadata:
    """Adds fixed metadata to every call of an asyncio channel (one subclass per call kind: a channel
    files each interceptor under the first kind it is an instance of)."""

    def __init__(self, pairs: tuple[tuple[str, str], ...]) -> None:
        self.pairs = pairs

    def _details(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()), *self.pairs)
        return details._replace(metadata=metadata)


class _UnaryUnary(_AddMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_AddMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_AddMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStream(_AddMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)
