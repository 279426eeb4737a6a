"""The prefill worker: computes prompts (chunked, with its own prefix cache), samples the first token and
sends each layer's latent KV to the decode worker the router chose while the next layer computes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
import time

import grpc
import torch
from typing_extensions import override

from k2serve.engine.async_engine import AsyncEngine
from k2serve.engine.protocol import BackendError, GenerateRequest, SessionHint
from k2serve.engine.sampling_params import SamplingParamsError
from k2serve.proto import kv_transfer_pb2, worker_pb2, worker_pb2_grpc
from k2serve.rpc.convert import logprob_to_proto, sampling_from_proto
from k2serve.rpc.status import status_of
from k2serve.rpc.tls import TLSFiles
from k2serve.tracing.propagation import of_call
from k2serve.tracing.tracer import NOOP, Attr, Span, Tracer, epoch_ns
from k2serve.transfer.base import KVSender, TransferError
from k2serve.transfer.metrics import KVTransferMetrics
from k2serve.transfer.registry import make_sender

logger = logging.getLogger(__name__)
TRANSFER_TIMEOUT_S = 60.0


def route(endpoint: kv_transfer_pb2.KVEndpoint, tls: bool, device_type: str) -> tuple[str, str]:
    """(backend, address) a sender uses for a decode worker's KV endpoint: its own backend, or, for a
    torch endpoint this worker cannot pair with (it uses TLS, which torch.distributed lacks, or its
    tensors are on another device type than the endpoint's payload_device), the endpoint's gRPC
    `fallback`. Raises ValueError naming why when the endpoint offers none. A handshake that fails is
    never a reason to fall back: that is a peer without the cluster token."""
    backend = endpoint.backend or "grpc"
    if backend != "torch":
        return backend, endpoint.address
    why = ""
    if tls:
        why = "this worker uses TLS and torch.distributed moves plaintext"
    elif endpoint.payload_device and endpoint.payload_device != device_type:
        why = f"it takes {endpoint.payload_device} payloads and this worker's KV is on {device_type}"
    if not why:
        return backend, endpoint.address
    if endpoint.HasField("fallback") and endpoint.fallback.backend == "grpc" and endpoint.fallback.address:
        return "grpc", endpoint.fallback.address
    raise ValueError(f"{endpoint.address} offers the torch KV backend only, and {why}")


class _Senders:
    """One KVSender per decode endpoint, created on first use and shared by all requests; over TLS
    (presenting this worker's certificate) when `tls` is given; gRPC senders send `metadata` (the
    cluster token) with every transfer; torch senders get `torch_options` (their device)."""

    def __init__(
        self,
        tls: TLSFiles | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
        torch_options: dict[str, object] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._senders: dict[tuple[str, str], KVSender] = {}
        self._options: dict[str, object] = {}
        self._metadata = metadata
        self._torch_options = dict(torch_options or {})
        if tls is not None:
            self._options = {"credentials": tls.channel_credentials(), "server_name": tls.server_name}

    def route(self, endpoint: kv_transfer_pb2.KVEndpoint) -> tuple[str, str]:
        """(backend, address) for that endpoint (`route`, with this worker's TLS and KV device)."""
        device = torch.device(self._torch_options.get("device", "cpu"))  # type: ignore[call-overload]  # a device or its name
        return route(endpoint, bool(self._options), device.type)

    def get(self, backend: str, address: str) -> KVSender:
        """The sender for that endpoint; a broken one (its decode worker restarted at the same
        address, say) is replaced. Connecting may block (torch: a TCPStore and gloo rendezvous):
        call from a thread."""
        with self._lock:
            key = (backend, address)
            stale = self._senders.get(key)
            if stale is not None and stale.broken is not None:
                logger.info("KV sender to %s %s is broken (%s); reconnecting", backend, address, stale.broken)
                del self._senders[key]
                threading.Thread(target=stale.shutdown, name="kv-sender-shutdown", daemon=True).start()
            if key not in self._senders:
                if self._options and backend != "grpc":
                    raise ValueError(
                        f"{address} offers the plaintext {backend!r} KV backend; this worker uses TLS"
                    )
                per_backend: dict[str, object] = {"metadata": self._metadata} if backend == "grpc" else {}
                if backend == "torch":
                    per_backend = self._torch_options
                self._senders[key] = make_sender(backend, address, **self._options, **per_backend)
            return self._senders[key]

    def shutdown(self) -> None:
        with self._lock:
            senders, self._senders = list(self._senders.values()), {}
        for s in senders:
            s.shutdown()


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        tls: TLSFiles | None = None,
        tracer: Tracer = NOOP,
        metadata: tuple[tuple[str, str], ...] = (),
        transfer_options: dict[str, object] | None = None,
    ) -> None:
        """tls / metadata: how KV senders reach decode workers (TLS files, the cluster token);
        transfer_options: the torch senders' options (`WorkerSettings.kv_transfer_options`: the device)."""
        self.engine = engine
        self.tracer = tracer
        self.senders = _Senders(tls, metadata, transfer_options)
        self.bytes_sent = 0
        self.transfer_metrics = KVTransferMetrics(engine.metrics.registry, engine.metrics.labels)

    @override
    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        attributes: dict[str, Attr] = {
            "k2serve.request_id": request.request_id,
            "k2serve.prompt_tokens": len(request.prompt_token_ids),
        }
        with self.tracer.start(
            "prefill.request", of_call(context), kind="server", attributes=attributes
        ) as span:
            return await self._prefill(request, context, span)

    async def _prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext, span: Span
    ) -> worker_pb2.PrefillResponse:
        """Spans: prefill.queue (until the engine hands over the first layer's latent: with chunked
        prefill, that of the last chunk), prefill.compute with a kv.send_layer per layer (until its bytes
        are out), kv.flush (until the decode worker verified every layer)."""
        t0 = time.perf_counter()
        target = request.decode_target
        if not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
        if not target.transfer_id or not target.endpoint.address:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "decode_target needs a transfer_id and an endpoint"
            )
        try:
            params = sampling_from_proto(request.sampling)
        except SamplingParamsError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        # Only the first token is sampled here; stop strings are the decode side's business.
        first_params = dataclasses.replace(
            params, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=[]
        )
        structured = json.loads(request.structured_json) if request.structured_json else None
        prompt = list(request.prompt_token_ids)
        kv = self.engine.kv_geometry
        tid = target.transfer_id
        compute: list[Span] = []  # prefill.compute, opened by the first layer
        traced = self.tracer.enabled
        try:
            backend = target.endpoint.backend or "grpc"
            backend, address = self.senders.route(target.endpoint)
            sender = await asyncio.to_thread(self.senders.get, backend, address)
            sender.open(tid, kv.num_layers, len(prompt), kv.kv_dim, kv.dtype, span.traceparent)
        except (RuntimeError, ValueError, OSError) as err:  # TransferError, DistStoreError, bad endpoint
            self.transfer_metrics.failed(backend)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot reach decode endpoint: {err}")
        t_compute_end = 0.0
        send_errors: list[Exception] = []

        def sink(layer: int, latent: torch.Tensor) -> None:  # on the engine thread, inside the step
            # Never raises: an exception here would fail the whole engine step (every request in it).
            if send_errors:
                return
            if traced and not compute:
                span.child("prefill.queue", start_ns=epoch_ns(t0)).end()
                compute.append(span.child("prefill.compute"))
            send = compute[0].child("kv.send_layer", attributes={"k2serve.layer": layer}) if traced else None
            try:
                sent = sender.send_layer(tid, layer, latent)  # close() then waits for the receiver's verdict
                if send is not None:
                    sent.add_done_callback(lambda _: send.end())
            except Exception as err:  # noqa: BLE001 - the transfer is gone (closed, timed out): this request fails
                send_errors.append(err)
                if send is not None:
                    send.fail(err)
                    send.end()

        last = None
        try:
            # with --kv-session-lease-s, the prompt's blocks are leased under the session (lease) key
            session = SessionHint(request.session_id) if request.session_id else None
            events = await self.engine.generate(
                GenerateRequest(request.request_id, prompt, first_params, structured, session), kv_sink=sink
            )
            async for ev in events:
                last = ev
        except BackendError as err:
            span.fail(err)
            with contextlib.suppress(
                TransferError
            ):  # drop the half-open transfer (it raises: layers missing)
                await asyncio.to_thread(sender.close, tid, 0.1)
            await context.abort(status_of(err), str(err))
        finally:
            t_compute_end = time.perf_counter()
            for c in compute:  # prefill.compute, also when the engine failed
                c.end()
        if last is None or not last.token_ids or last.finish_reason == "abort":
            await context.abort(grpc.StatusCode.CANCELLED, f"prefill of {request.request_id!r} was aborted")
        # at least the count with this prompt: the engine publishes it under the lock its stats() takes,
        # in the step that handed over the token received above
        prompts_computed = self.engine.stats().prompts_computed
        if send_errors:
            self.transfer_metrics.failed(backend)
            with contextlib.suppress(TransferError):
                await asyncio.to_thread(sender.close, tid, 0.1)
            await context.abort(grpc.StatusCode.ABORTED, f"KV transfer failed: {send_errors[0]}")
        try:
            # The sender is shared by every transfer to that decode endpoint: one failed transfer must not
            # tear it down for the others (gRPC channels reconnect by themselves).
            with span.child("kv.flush"):
                stats = await asyncio.to_thread(sender.close, tid, TRANSFER_TIMEOUT_S)
        except TransferError as err:
            self.transfer_metrics.failed(backend)
            await context.abort(grpc.StatusCode.ABORTED, f"KV transfer failed: {err}")
        t_end = time.perf_counter()
        self.transfer_metrics.done(backend, stats)
        nbytes = len(prompt) * kv.bytes_per_token
        self.bytes_sent += nbytes
        resp = worker_pb2.PrefillResponse(
            first_token_id=last.token_ids[0],
            num_prompt_tokens=len(prompt),
            num_cached_tokens=last.num_cached_tokens,
            bytes_sent=nbytes,
            prompts_computed=prompts_computed,
            timings=worker_pb2.PrefillTimings(
                compute_ms=(t_compute_end - t0) * 1e3,
                # exposed transfer time: what was still on the wire once compute had finished
                transfer_ms=(t_end - t_compute_end) * 1e3,
                total_ms=(t_end - t0) * 1e3,
            ),
        )
        if last.logprobs:
            resp.first_token_logprobs.CopyFrom(logprob_to_proto(last.logprobs[0]))
        return resp

    @override
    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        await self.engine.abort(request.request_id)
        return worker_pb2.AbortResponse(found=True)
