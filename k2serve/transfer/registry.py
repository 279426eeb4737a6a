"""Pick a KV-transfer backend by name: workers read it from KVEndpoint.backend ("grpc" | "torch").

Endpoints are "host:port" for both backends: the KVTransfer gRPC server for "grpc", the
receiver's rendezvous TCPStore for "torch". A receiver given port 0 picks a free one; read the
actual address from `receiver.endpoint`.
"""

from __future__ import annotations

from typing import Any

from k2serve.transfer.base import KVReceiver, KVSender

BACKENDS = ("grpc", "torch")


class UnknownBackendError(ValueError):
    """No transfer backend has this name; carries it."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown KV transfer backend {name!r}; choose one of {BACKENDS}")
        self.name = name


def make_sender(backend: str, endpoint: str, **options: Any) -> KVSender:
    """A sender connected to the receiver at endpoint.

    options: "grpc": max_chunk_bytes, credentials (grpc.ChannelCredentials: TLS), server_name, metadata
    (sent with every transfer: the cluster token);
    "torch": local_host, device, connect_timeout (seconds), token (the cluster token: the pair's
    handshake proves it both ways). The torch backend is plaintext only.
    """
    if backend == "grpc":
        from k2serve.transfer.grpc_backend import GrpcKVSender

        return GrpcKVSender(endpoint, **options)
    if backend == "torch":
        from k2serve.transfer.torch_sender import TorchKVSender

        return TorchKVSender(endpoint, **options)
    raise UnknownBackendError(backend)


def make_receiver(backend: str, endpoint: str = "127.0.0.1:0", **options: Any) -> KVReceiver:
    """A receiver listening at endpoint ("host:0" picks a free port).

    options: "grpc": server (an existing grpc.Server to join; endpoint is then its address),
    max_workers, credentials (grpc.ServerCredentials: TLS, possibly requiring client certificates),
    interceptors (grpc.ServerInterceptor: the cluster-token check);
    "torch": device, connect_timeout (seconds), max_chunk_bytes, token (as for make_sender). The torch
    backend is plaintext only.
    """
    if backend == "grpc":
        from k2serve.transfer.grpc_backend import GrpcKVReceiver

        return GrpcKVReceiver(endpoint, **options)
    if backend == "torch":
        from k2serve.transfer.torch_receiver import TorchKVReceiver
        from k2serve.transfer.torch_wire import split_endpoint

        host, port = split_endpoint(endpoint)
        return TorchKVReceiver(host, port, **options)
    raise UnknownBackendError(backend)
