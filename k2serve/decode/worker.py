"""The decode worker: reserves KV blocks for an incoming request, receives its latent straight into the
paged pool, continues it in the continuous batch and streams tokens back. Every reservation ends in
exactly one of: a Decode that adopts the blocks, a Release, a failed transfer, or expiry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from typing_extensions import override

from k2serve.engine.async_engine import AsyncEngine, Prefilled
from k2serve.engine.protocol import BackendError, GenerateRequest, SessionHint, TokenEvent
from k2serve.engine.sampling_params import SamplingParams, SamplingParamsError
from k2serve.kvcache.block_manager import NoFreeBlocksError
from k2serve.proto import kv_transfer_pb2, worker_pb2, worker_pb2_grpc
from k2serve.proto.messages import finish_to_proto
from k2serve.rpc.convert import logprob_to_proto, sampling_from_proto
from k2serve.rpc.status import status_of
from k2serve.tracing.propagation import of_call
from k2serve.tracing.tracer import NOOP, Attr, Span, Tracer, epoch_ns
from k2serve.transfer.base import KVReceiver, TransferError, TransferStats
from k2serve.transfer.metrics import KVTransferMetrics

logger = logging.getLogger(__name__)
TRANSFER_TIMEOUT_S = 60.0
RESERVATION_TTL_S = 900.0  # a request may wait this long in the prefill queue (use --max-ttft-ms to bound it)


@dataclass
class Reservation:
    request_id: str
    block_table: list[int]
    num_tokens: int
    created: float


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        receiver: KVReceiver,
        backend: str,
        address: str | None = None,
        tracer: Tracer = NOOP,
        payload_device: str = "",
        fallback: str | None = None,
    ) -> None:
        """address: the KV endpoint ("host:port") prefill workers are told to send to; default the
        receiver's bound one, which peers on other hosts cannot use when it binds 0.0.0.0.
        payload_device ("cpu" | "cuda") and fallback (the advertised "host:port" of a gRPC receiver
        sharing the torch receiver's transfers): what a torch endpoint tells senders, so that those
        that cannot pair with it send over gRPC instead."""
        self.engine = engine
        self.tracer = tracer
        self.receiver = receiver
        self.backend = backend
        self.address = address or receiver.endpoint
        self.payload_device = payload_device
        self.fallback = fallback
        self.reservations: dict[str, Reservation] = {}
        self.bytes_received = 0
        self.local_prefills = 0  # requests whose prompt this worker computed itself
        self.transfer_metrics = KVTransferMetrics(engine.metrics.registry, engine.metrics.labels)
        self.transfer_metrics.declare(backend)
        if fallback:
            self.transfer_metrics.declare("grpc")

    def endpoint(self) -> kv_transfer_pb2.KVEndpoint:
        ep = kv_transfer_pb2.KVEndpoint(backend=self.backend, address=self.address)
        if self.backend == "torch":
            ep.payload_device = self.payload_device
            if self.fallback:
                ep.fallback.CopyFrom(kv_transfer_pb2.KVEndpoint(backend="grpc", address=self.fallback))
        return ep

    @override
    async def Reserve(
        self, request: worker_pb2.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReserveResponse:
        attributes = {"k2serve.request_id": request.request_id}
        with self.tracer.start("decode.reserve", of_call(context), kind="server", attributes=attributes):
            return await self._reserve(request, context)

    async def _reserve(
        self, request: worker_pb2.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReserveResponse:
        n = request.num_prompt_tokens
        if n < 1 or n + request.max_tokens > self.engine.max_model_len:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"num_prompt_tokens {n} + max_tokens {request.max_tokens} must be in [1, {self.engine.max_model_len}]",
            )
        try:
            reservation = await self.engine.reserve_kv(n)
        except NoFreeBlocksError as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no KV blocks for {n} tokens: {err}")
        remaining = context.time_remaining()
        if context.cancelled() or (remaining is not None and remaining <= 0):
            # the caller gave up while the engine was busy: nobody will claim or release these blocks
            await self.engine.free_kv(reservation.block_table)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the reservation outlived its caller")
        tid = f"kv-{uuid.uuid4().hex[:16]}"
        kv = self.engine.kv_geometry
        # Consecutive blocks (the usual case) are one span per layer: the backend may receive into it.
        place = reservation.rows if reservation.contiguous else None
        try:  # reservation.write runs on a receiver thread: into blocks nobody else uses
            self.receiver.expect(tid, kv.num_layers, n, kv.kv_dim, kv.dtype, reservation.write, place=place)
        except ValueError as err:
            await self.engine.free_kv(reservation.block_table)
            await context.abort(grpc.StatusCode.INTERNAL, f"cannot expect transfer: {err}")
        self.reservations[tid] = Reservation(request.request_id, reservation.block_table, n, time.monotonic())
        return worker_pb2.ReserveResponse(
            transfer_id=tid,
            block_ids=reservation.block_table,
            block_size=kv.block_size,
            endpoint=self.endpoint(),
        )

    @override
    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeChunk]:
        """Spans: kv.receive (first chunk to last layer, a child of the sender's span) with kv.verify
        (the checksumming, summed, drawn ending at the last layer), decode.queue (until the engine took the
        request: waiting for the KV included), decode.first_token, decode.stream."""
        attributes = {"k2serve.request_id": request.request_id}
        with self.tracer.start(
            "decode.request", of_call(context), kind="server", attributes=attributes
        ) as span:
            async for chunk in self._decode(request, context, span):
                yield chunk

    async def _decode(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext, span: Span
    ) -> AsyncIterator[worker_pb2.DecodeChunk]:
        t0 = time.perf_counter()
        if not request.transfer_id:  # conditional disaggregation: compute the prompt here (prefix cache)
            async for chunk in self._local(request, context, span, t0):
                yield chunk
            return
        res = self.reservations.pop(request.transfer_id, None)
        if res is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no reservation {request.transfer_id!r}")
        try:
            stats = await asyncio.to_thread(self.receiver.wait, request.transfer_id, TRANSFER_TIMEOUT_S)
            self.bytes_received += stats.bytes
            self.transfer_metrics.done("grpc" if stats.via_grpc else self.backend, stats)
            if self.tracer.enabled:
                self._trace_transfer(stats, span)
        except TransferError as err:
            self.transfer_metrics.failed(self.backend)
            await self.engine.free_kv(res.block_table)
            await context.abort(grpc.StatusCode.DATA_LOSS, f"KV transfer failed: {err}")
        if len(request.prompt_token_ids) != res.num_tokens:
            await self.engine.free_kv(res.block_table)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt has {len(request.prompt_token_ids)} tokens, the reservation {res.num_tokens}",
            )
        try:
            params = sampling_from_proto(request.sampling)
        except SamplingParamsError as err:
            await self.engine.free_kv(res.block_table)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        structured = json.loads(request.structured_json) if request.structured_json else None
        gen = _generate_request(request, params, structured)
        try:
            # From here the engine owns the blocks (also when it refuses the request).
            events = await self.engine.generate(
                gen, prefilled=Prefilled(request.first_token_id, res.block_table)
            )
        except BackendError as err:
            await context.abort(status_of(err), str(err))
        span.child("decode.queue", start_ns=epoch_ns(t0)).end()
        async for chunk in self._stream(request.request_id, events, 1, context, span):
            yield chunk

    def _trace_transfer(self, stats: TransferStats, span: Span) -> None:
        """kv.receive and kv.verify, drawn from the receiver's measurements."""
        end = epoch_ns(stats.finished_at)
        backend = "grpc" if stats.via_grpc else self.backend
        attributes: dict[str, Attr] = {"k2serve.kv.bytes": stats.bytes, "k2serve.kv.backend": backend}
        start = end - round(stats.seconds * 1e9)
        if stats.traceparent:  # the prefill worker's span: the transfer continues it
            receive = self.tracer.start(
                "kv.receive", stats.traceparent, start_ns=start, attributes=attributes
            )
        else:
            receive = span.child("kv.receive", start_ns=start, attributes=attributes)
        receive.child("kv.verify", start_ns=end - round(stats.verify_seconds * 1e9)).end(end)
        receive.end(end)

    async def _local(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext, span: Span, t0: float
    ) -> AsyncIterator[worker_pb2.DecodeChunk]:
        """The whole request here: prompt (reusing this worker's cached prefix) and decode; the first
        token is the first streamed one."""
        try:
            params = sampling_from_proto(request.sampling)
        except SamplingParamsError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        structured = json.loads(request.structured_json) if request.structured_json else None
        gen = _generate_request(request, params, structured)
        try:
            events = await self.engine.generate(gen)
        except BackendError as err:
            await context.abort(status_of(err), str(err))
        self.local_prefills += 1
        span.child("decode.queue", start_ns=epoch_ns(t0)).end()
        async for chunk in self._stream(request.request_id, events, 0, context, span):
            yield chunk

    async def _stream(
        self,
        request_id: str,
        events: AsyncIterator[TokenEvent],
        done: int,
        context: grpc.aio.ServicerContext,
        span: Span,
    ) -> AsyncIterator[worker_pb2.DecodeChunk]:
        finished = False
        phase = span.child("decode.first_token")
        first = True
        try:
            async for ev in events:
                if first:
                    phase.end()
                    phase = span.child("decode.stream")
                    first = False
                done += len(ev.token_ids)
                finished = ev.finish_reason is not None
                yield worker_pb2.DecodeChunk(
                    request_id=request_id,
                    num_cached_tokens=ev.num_cached_tokens,
                    token_ids=ev.token_ids,
                    logprobs=[logprob_to_proto(lp) for lp in ev.logprobs or []],
                    finish_reason=finish_to_proto(ev.finish_reason),
                    completion_tokens=done,
                )
        except BackendError as err:
            phase.fail(err)
            await context.abort(status_of(err), str(err))
        finally:
            phase.set("k2serve.completion_tokens", done)
            phase.end()
            if not finished:  # the router went away (cancelled stream): free the request's blocks
                await asyncio.shield(self.engine.abort(request_id))

    @override
    async def Release(
        self, request: worker_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReleaseResponse:
        res = self.reservations.pop(request.transfer_id, None)
        if res is None:
            return worker_pb2.ReleaseResponse(released=False)
        # cancel returns once no payload can land in the blocks any more (a thread: it may wait for one)
        await asyncio.to_thread(self.receiver.cancel, request.transfer_id)
        await self.engine.free_kv(res.block_table)
        return worker_pb2.ReleaseResponse(released=True)

    @override
    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        for tid, res in list(self.reservations.items()):
            if res.request_id == request.request_id:
                await self.Release(worker_pb2.ReleaseRequest(transfer_id=tid), context)
        await self.engine.abort(request.request_id)
        return worker_pb2.AbortResponse(found=True)

    async def expire_reservations(self, stop: asyncio.Event) -> None:
        """Release reservations nobody claimed (the router died between Reserve and Decode)."""
        while not stop.is_set():
            now = time.monotonic()
            for tid, res in list(self.reservations.items()):
                if now - res.created > RESERVATION_TTL_S:
                    logger.warning("reservation %s of %s expired; releasing", tid, res.request_id)
                    self.reservations.pop(tid, None)
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(self.receiver.cancel, tid)
                    await self.engine.free_kv(res.block_table)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=5)


def _generate_request(
    request: worker_pb2.DecodeRequest, params: SamplingParams, structured: dict[str, Any] | None
) -> GenerateRequest:
    """The engine request of a Decode call; with a session_id (and --kv-session-lease-s) the finished
    turn's blocks are leased under it."""
    session = SessionHint(request.session_id) if request.session_id else None
    return GenerateRequest(request.request_id, list(request.prompt_token_ids), params, structured, session)
