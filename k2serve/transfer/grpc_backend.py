"""KV transfer over gRPC: one client-streaming KVTransfer.Push call per transfer.

Endpoint: "host:port" of a gRPC server hosting the KVTransfer service (the decode worker's own
server, or one the receiver starts). Layers larger than KV_CHUNK_MAX_BYTES are split along tokens.
The sender uses a dedicated channel with the KV message limits; the receiver's server must be
created with the same limits (`grpc_options(KV_MAX_MESSAGE_BYTES)`). Both sides (de)serialize
chunks with grpc_codec, which is wire-identical to the generated KVChunk but copies less.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from concurrent.futures import Future

import grpc
import torch

from k2serve.proto import kv_transfer_pb2
from k2serve.proto.limits import KV_CHUNK_MAX_BYTES, KV_MAX_MESSAGE_BYTES, RECONNECT_OPTIONS, grpc_options
from k2serve.transfer.base import (
    ChunkError,
    KVReceiver,
    OnLayer,
    Place,
    TransferError,
    TransferSpec,
    TransferStats,
    TransferTimeout,
)
from k2serve.transfer.grpc_codec import decode_chunk, encode_chunk
from k2serve.transfer.inbox import GRPC_SOURCE_PREFIX, Inbox
from k2serve.transfer.outbox import SenderBase, split_layer

_LayerItem = tuple[int, torch.Tensor, "Future[None]"]
_SERVICE = kv_transfer_pb2.DESCRIPTOR.services_by_name["KVTransfer"].full_name
_PUSH = f"/{_SERVICE}/Push"


class _Stream:
    """One Push call: layers queued by send_layer, turned into chunks on gRPC's request thread."""

    def __init__(
        self,
        push: grpc.StreamUnaryMultiCallable,
        spec: TransferSpec,
        max_chunk_bytes: int,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.spec = spec
        self.max_chunk_bytes = max_chunk_bytes
        self.queue: queue.SimpleQueue[_LayerItem | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.pending: list[Future[None]] = []
        self.call: grpc.Future = push.future(self._chunks(), metadata=metadata or None)
        self.call.add_done_callback(self._on_call_done)

    def _chunks(self) -> Iterator[tuple[kv_transfer_pb2.KVChunkHeader, torch.Tensor]]:
        while (item := self.queue.get()) is not None:
            layer, kv, fut = item
            yield from split_layer(self.spec, layer, kv, self.max_chunk_bytes)
            fut.set_result(None)  # gRPC serialized the last chunk; delivery is confirmed by the call's result

    def _on_call_done(self, call: grpc.Future) -> None:
        self.queue.put(None)  # let gRPC's request thread leave _chunks if it waits there
        with self.lock:
            pending, self.pending = self.pending, []
        for fut in pending:
            if not fut.done():
                fut.set_exception(TransferError(self.spec.transfer_id, f"stream ended: {_describe(call)}"))

    def put(self, layer: int, kv: torch.Tensor) -> Future[None]:
        fut: Future[None] = Future()
        with self.lock:
            if self.call.done():
                fut.set_exception(
                    TransferError(self.spec.transfer_id, f"stream ended: {_describe(self.call)}")
                )
                return fut
            self.pending.append(fut)
        self.queue.put((layer, kv, fut))
        return fut


def _describe(call: grpc.Future) -> str:
    if call.cancelled():
        return "cancelled by the sender"
    err = call.exception()
    if err is None:
        return "completed"
    if isinstance(err, grpc.RpcError):
        return f"{err.code().name}: {err.details()}"
    return f"{type(err).__name__}: {err}"


class GrpcKVSender(SenderBase):
    """Sends transfers to one KVTransfer server over a dedicated channel."""

    def __init__(
        self,
        endpoint: str,
        max_chunk_bytes: int = KV_CHUNK_MAX_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """credentials: TLS (None: plaintext); server_name: the name to check in the receiver's
        certificate instead of the endpoint's host (TLS only); metadata: sent with every transfer
        (the cluster token)."""
        super().__init__()
        if not 0 < max_chunk_bytes <= KV_CHUNK_MAX_BYTES:
            raise ValueError(f"max_chunk_bytes {max_chunk_bytes} not in (0, {KV_CHUNK_MAX_BYTES}]")
        if server_name is not None and credentials is None:
            raise ValueError(f"server_name {server_name!r} needs TLS credentials")
        self.endpoint = endpoint
        self._max_chunk_bytes = max_chunk_bytes
        self._metadata = metadata
        options: list[tuple[str, int | str]] = [*grpc_options(KV_MAX_MESSAGE_BYTES), *RECONNECT_OPTIONS]
        if credentials is None:
            self._channel = grpc.insecure_channel(endpoint, options=options)
        else:
            if server_name is not None:
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.secure_channel(endpoint, credentials, options=options)
        self._push = self._channel.stream_unary(
            _PUSH, request_serializer=encode_chunk, response_deserializer=kv_transfer_pb2.KVPushAck.FromString
        )
        self._streams: dict[str, _Stream] = {}
        self._closed = False

    def _start(self, spec: TransferSpec) -> None:
        self._streams[spec.transfer_id] = _Stream(self._push, spec, self._max_chunk_bytes, self._metadata)

    def _send(self, spec: TransferSpec, layer: int, kv: torch.Tensor) -> Future[None]:
        return self._streams[spec.transfer_id].put(layer, kv)

    def _finish(self, spec: TransferSpec, timeout: float, complete: bool) -> None:
        stream = self._streams.pop(spec.transfer_id)
        if not complete:
            stream.call.cancel()
            return
        stream.queue.put(None)
        try:
            ack = stream.call.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            stream.call.cancel()
            raise TransferTimeout(spec.transfer_id, timeout, "no acknowledgement from the receiver") from None
        except grpc.FutureCancelledError:
            raise TransferError(spec.transfer_id, "cancelled by the sender (shutdown)") from None
        except grpc.RpcError as e:
            raise TransferError(spec.transfer_id, f"receiver rejected it: {_describe(stream.call)}") from e
        if not ack.ok:
            raise TransferError(spec.transfer_id, f"receiver rejected it: {ack.error}")

    @property
    def broken(self) -> str | None:
        """gRPC channels reconnect by themselves: only a shut-down sender is broken."""
        return "sender shut down" if self._closed else None

    def shutdown(self) -> None:
        self._closed = True
        for stream in list(self._streams.values()):
            stream.call.cancel()
        self._streams.clear()
        self._channel.close()


_STATUS_FOR_FIELD = {"transfer_id": grpc.StatusCode.NOT_FOUND, "checksum": grpc.StatusCode.DATA_LOSS}


class _Servicer:
    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    def push(
        self,
        request_iterator: Iterator[tuple[kv_transfer_pb2.KVChunkHeader, memoryview]],
        context: grpc.ServicerContext,
    ) -> kv_transfer_pb2.KVPushAck:
        transfer_id, complete, received = "", False, 0
        source = f"{GRPC_SOURCE_PREFIX}{context.peer()}:{id(context)}"
        try:
            for header, payload in request_iterator:
                transfer_id = header.transfer_id
                complete = self.inbox.accept(header, payload, source)
                received += payload.nbytes
        except ChunkError as e:
            context.abort(_STATUS_FOR_FIELD.get(e.field, grpc.StatusCode.INVALID_ARGUMENT), str(e))
        except TransferError as e:  # failed earlier (timeout, cancel, on_layer)
            context.abort(grpc.StatusCode.CANCELLED, str(e))
        except grpc.RpcError:  # the sender went away mid-stream
            self.inbox.fail(transfer_id, TransferError(transfer_id, "sender disconnected mid-stream"))
            raise
        if not complete:
            reason = f"stream ended before the last layer ({received} bytes received)"
            self.inbox.fail(transfer_id, TransferError(transfer_id, reason))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"transfer {transfer_id!r}: {reason}")
        return kv_transfer_pb2.KVPushAck(transfer_id=transfer_id, ok=True, bytes_received=received)


def _handler(inbox: Inbox) -> grpc.GenericRpcHandler:
    push = grpc.stream_unary_rpc_method_handler(
        _Servicer(inbox).push,
        request_deserializer=decode_chunk,
        response_serializer=kv_transfer_pb2.KVPushAck.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(_SERVICE, {"Push": push})


class GrpcKVReceiver(KVReceiver):
    """KVTransfer servicer on a gRPC server.

    With `server`, the servicer is added to it (call before server.start(); the server must have
    the KV message limits) and `endpoint` must be the address it listens on. Without, the
    receiver starts its own server bound to `endpoint` ("host:0" picks a free port), with TLS when
    `credentials` are given (they must be None with `server`, which has its own ports) and the
    server `interceptors` (e.g. the cluster-token check; likewise only for its own server).

    With `inbox`, it serves the expected transfers of another receiver (a torch receiver's, as the
    fallback for senders that cannot pair with it): `expect`, `wait` and `cancel` go to that
    receiver, and shutting this one down leaves its inbox open.
    """

    def __init__(
        self,
        endpoint: str = "127.0.0.1:0",
        server: grpc.Server | None = None,
        max_workers: int = 16,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        inbox: Inbox | None = None,
    ) -> None:
        if server is not None and (credentials is not None or interceptors):
            raise ValueError(
                "credentials and interceptors apply to the receiver's own server; configure `server` instead"
            )
        self._own_inbox = inbox is None
        self._inbox = Inbox() if inbox is None else inbox
        self._own_server = server is None
        if server is None:
            server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kv-grpc"),
                options=grpc_options(KV_MAX_MESSAGE_BYTES),
                interceptors=list(interceptors),
            )
            host = endpoint.rsplit(":", 1)[0]
            if credentials is None:
                port = server.add_insecure_port(endpoint)
            else:
                port = server.add_secure_port(endpoint, credentials)
            if port == 0:
                raise OSError(f"cannot bind KV gRPC server to {endpoint!r}")
            endpoint = f"{host}:{port}"
            server.add_generic_rpc_handlers((_handler(self._inbox),))
            server.start()
        else:
            server.add_generic_rpc_handlers((_handler(self._inbox),))
        self._server = server
        self._endpoint = endpoint

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def expect(
        self,
        transfer_id: str,
        num_layers: int,
        num_tokens: int,
        kv_dim: int,
        dtype: torch.dtype,
        on_layer: OnLayer,
        place: Place | None = None,
    ) -> None:
        """`place` is ignored: payloads arrive in gRPC's own buffers, so every layer goes through on_layer."""
        self._inbox.expect(TransferSpec(transfer_id, num_layers, num_tokens, kv_dim, dtype), on_layer)

    def wait(self, transfer_id: str, timeout: float) -> TransferStats:
        return self._inbox.wait(transfer_id, timeout)

    def cancel(self, transfer_id: str) -> bool:
        return self._inbox.cancel(transfer_id)

    def shutdown(self) -> None:
        if self._own_inbox:
            self._inbox.close("receiver shut down")
        if self._own_server:
            self._server.stop(grace=None).wait(5)
