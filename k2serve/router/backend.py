"""ClusterBackend: the GenerationBackend the router's HTTP and gRPC APIs run on.

A request goes Reserve (decode) -> Prefill (prefill, which ships the KV to the reservation) ->
Decode (stream). The first token is the prefill's; the rest stream from the decode worker. A request
that fails before its first token reaches the client is retried once on other workers; afterwards a
worker failure ends the stream with BackendFailure. Every path that reserved blocks releases them.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import TextIO

import grpc

from k2serve.chat.tokenizer import KimiTokenizer, load_tokenizer
from k2serve.config import ModelConfig
from k2serve.engine.protocol import (
    BackendFailure,
    BackendStats,
    DrainingError,
    GenerateRequest,
    InvalidRequestError,
    QueueFullError,
    TokenEvent,
    UnavailableError,
)
from k2serve.engine.validation import validate_request
from k2serve.proto import common_pb2, worker_pb2
from k2serve.proto.messages import finish_from_proto
from k2serve.router.lease_keys import LeaseKeys
from k2serve.router.policy import Choice, KVAware, NoWorkerError, PromptBlocks, RoutingPolicy, kv_fits
from k2serve.router.registry import Worker, WorkerTable
from k2serve.rpc.convert import logprob_from_proto, sampling_to_proto
from k2serve.rpc.status import error_of
from k2serve.tracing.propagation import incoming
from k2serve.tracing.tracer import NOOP, Attr, Span, Tracer

logger = logging.getLogger(__name__)
_TRANSPORT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DATA_LOSS}


class ClusterBackend:
    def __init__(
        self,
        model_dir: str | Path,
        table: WorkerTable,
        model_name: str | None = None,
        policy: RoutingPolicy | None = None,
        max_in_flight: int = 1024,
        local_prefill_threshold: float = 0.5,
        max_predicted_ttft_s: float | None = None,
        tracer: Tracer = NOOP,
    ) -> None:
        self.table = table
        self.tracer = tracer
        self.policy = policy or KVAware(table.kv_index)
        self._tokenizer = load_tokenizer(model_dir)
        self._config = ModelConfig.from_file(model_dir)
        self._model_name = model_name or Path(model_dir).resolve().name
        self.max_in_flight = max_in_flight
        self.in_flight: dict[str, tuple[Worker | None, Worker | None]] = {}
        self.draining = False
        self.bytes_transferred = 0
        self.local_prefill_threshold = local_prefill_threshold
        self.local_prefills = 0  # session turns served by their holder without a prefill worker
        self.prefill_retries = 0  # prefills that failed retriably and were sent to another worker
        # Early rejection: predicted TTFT = prompt tokens waiting for prefill (this one included) / the
        # prefill throughput the cluster showed (EWMA of tokens per second of compute, per worker).
        self.max_predicted_ttft_s = max_predicted_ttft_s
        self.prefill_tok_s: float | None = None
        self.pending_prefill_tokens = 0
        self.rejected = 0  # refused for their predicted TTFT
        self.rejected_queue_full = 0  # refused at --max-queue requests in flight
        # Overlap of KV sending with compute: the transfer time left after the prefill's compute ended.
        self.prefill_compute_ms = 0.0
        self.exposed_transfer_ms = 0.0
        self._cleanups: set[asyncio.Future[None]] = set()
        # Routing: decisions by (role, reason), and the prefill workers' cached prompt tokens as the KV
        # index predicted them at the choice and as the workers reported them after the prefill.
        self.routing_decisions: dict[tuple[str, str], int] = {}
        self.predicted_hit_tokens = 0
        self.prefill_cached_tokens = 0
        # Session leases on the workers (their --kv-session-lease-s): the key each request carries.
        self.lease_keys = LeaseKeys()
        # --routing-log: one JSON line per answered prefill (`routing_record`), for diagnosis
        self.routing_log: TextIO | None = None

    # ---- GenerationBackend ---------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def tokenizer(self) -> KimiTokenizer:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        """The model's context, or less when every decode worker's pool holds fewer tokens."""
        pools = [w.info.capacity.total_blocks * w.info.block_size for w in self.table.of_role("decode")]
        pools = [p for p in pools if p > 0]  # static workers report no capacity
        limit = self._config.max_position_embeddings
        return min(limit, max(pools)) if pools else limit

    @property
    def vocab_size(self) -> int:
        return self._config.vocab_size

    def check_admission(self) -> None:
        if self.draining:
            raise DrainingError()
        if len(self.in_flight) >= self.max_in_flight:
            self.rejected_queue_full += 1
            raise QueueFullError(len(self.in_flight), self.max_in_flight)

    def stats(self) -> BackendStats:
        ws = list(self.table.workers.values())
        total = sum(w.load.total_blocks for w in ws if w.role == "decode")
        free = sum(w.load.free_blocks for w in ws if w.role == "decode")
        q = sum(w.load.prefix_query_tokens for w in ws)
        h = sum(w.load.prefix_hit_tokens for w in ws)
        return BackendStats(
            num_running=len(self.in_flight),
            num_waiting=sum(w.load.waiting for w in ws),
            kv_blocks_used=total - free,
            kv_blocks_total=total,
            prefix_hit_rate=h / q if q else 0.0,
            num_preemptions=0,
            prefix_query_tokens=q,
            prefix_hit_tokens=h,
        )

    def predicted_ttft_s(self, prompt_len: int) -> float | None:
        """Seconds until a new prompt of `prompt_len` tokens would get its first token, or None before
        any prefill was measured."""
        n = len(self.table.of_role("prefill"))
        if self.prefill_tok_s is None or n == 0:
            return None
        return (self.pending_prefill_tokens + prompt_len) / (self.prefill_tok_s * n)

    def _observe_prefill(self, tokens: int, compute_ms: float) -> None:
        if tokens <= 0 or compute_ms <= 0:
            return
        rate = tokens / (compute_ms / 1e3)
        self.prefill_tok_s = rate if self.prefill_tok_s is None else 0.8 * self.prefill_tok_s + 0.2 * rate

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Admit `request` and return its events; its span continues the caller's trace (`incoming()`)."""
        n = len(request.prompt_token_ids)
        attributes: dict[str, Attr] = {"k2serve.request_id": request.request_id, "k2serve.prompt_tokens": n}
        span = self.tracer.start("router.request", incoming(), kind="server", attributes=attributes)
        try:
            with span.child("router.admission"):
                self._admit(request)
        except BaseException as e:
            span.fail(e)
            span.end()
            raise
        return self._run(request, span)

    def _admit(self, request: GenerateRequest) -> None:
        self.check_admission()
        validate_request(
            request.prompt_token_ids,
            request.params,
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
        )
        limit = self.max_predicted_ttft_s
        predicted = self.predicted_ttft_s(len(request.prompt_token_ids)) if limit is not None else None
        if limit is not None and predicted is not None and predicted > limit:
            self.rejected += 1
            raise QueueFullError(
                len(self.in_flight), self.max_in_flight, retry_after_s=max(1.0, predicted - limit)
            )
        if request.request_id in self.in_flight:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in flight", "request_id")
        missing = self.table.missing()
        if missing:
            raise UnavailableError(missing, request.request_id)
        self.in_flight[request.request_id] = (None, None)

    async def abort(self, request_id: str) -> None:
        pair = self.in_flight.get(request_id)
        if pair is None:
            return
        for w, stub_of in ((pair[0], "prefill_stub"), (pair[1], "decode_stub")):
            if w is not None and w.worker_id in self.table.workers:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await getattr(w, stub_of).Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=5)

    def _background(self, call: Awaitable[object]) -> None:
        """A best-effort cleanup call nobody waits for (its failure is logged, not raised)."""

        async def run() -> None:
            try:
                await call
            except grpc.aio.AioRpcError as e:
                logger.info("cleanup call failed: %s", e.code().name)

        task = asyncio.ensure_future(run())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    # ---- one request ---------------------------------------------------------------------------
    async def _run(self, req: GenerateRequest, span: Span) -> AsyncIterator[TokenEvent]:
        """The request's events; ends `span` (router.request)."""
        rid = req.request_id
        n = len(req.prompt_token_ids)
        structured = json.dumps(req.structured) if req.structured is not None else ""
        sampling = sampling_to_proto(req.params)
        tried: set[str] = set()
        try:
            direct = self._direct_worker(req)
            if direct is not None:
                try:
                    # closed here, before the finally below: its own finally settles the holder's books
                    async with contextlib.aclosing(
                        self._run_direct(req, direct, sampling, structured, span)
                    ) as evs:
                        async for ev in evs:
                            yield ev
                    return
                except _Retryable as r:  # the holder is gone before any token: re-prefill elsewhere
                    logger.warning("session turn %s: %s; re-prefilling", rid, r)
                    tried.update(r.worker_ids)
            self.pending_prefill_tokens += n
            blocks = PromptBlocks(req.prompt_token_ids)  # its chain hashes: computed once, on first use
            try:
                for attempt in range(2):
                    try:
                        pre, dec, reservation, first = await self._prefill(
                            req, sampling, structured, frozenset(tried), span, blocks
                        )
                        compute_ms = first.timings.compute_ms
                        self.prefill_compute_ms += compute_ms
                        self.exposed_transfer_ms += first.timings.transfer_ms
                        self._observe_prefill(first.num_prompt_tokens - first.num_cached_tokens, compute_ms)
                        break
                    except _Retryable as r:
                        tried.update(r.worker_ids)
                        if attempt == 1 and r.no_worker is not None:
                            raise UnavailableError([f"{r.no_worker} worker"], rid) from r
                        if attempt == 1:
                            raise BackendFailure(str(r), rid) from r
                        self.prefill_retries += 1
            finally:
                self.pending_prefill_tokens -= n
            cached = first.num_cached_tokens
            self.prefill_cached_tokens += cached
            lps = (
                [logprob_from_proto(first.first_token_logprobs)]
                if first.HasField("first_token_logprobs")
                else None
            )
            yield TokenEvent([first.first_token_id], None, n, cached, lps)
            decode = worker_pb2.DecodeRequest(
                request_id=rid,
                transfer_id=reservation.transfer_id,
                prompt_token_ids=req.prompt_token_ids,
                first_token_id=first.first_token_id,
                sampling=sampling,
                structured_json=structured,
                session_id=_session_id(req),
            )
            events = self._stream_decode(
                req, dec, decode, span, cached_tokens=cached, retry_if_no_tokens=False
            )
            async with contextlib.aclosing(events):
                async for ev in events:
                    yield ev
        except Exception as e:
            span.fail(e)
            raise
        finally:
            span.end()
            pre_w, dec_w = self.in_flight.pop(rid, (None, None))
            for w in (pre_w, dec_w):
                if w is not None:
                    w.in_flight -= 1

    def _direct_worker(self, req: GenerateRequest) -> Worker | None:
        """Conditional disaggregation: a session turn goes straight to the decode worker holding its prefix
        (which computes the new tokens itself) when that prefix covers enough of the prompt."""
        hint = req.session
        if hint is None or hint.holder is None:
            return None
        w = self.table.workers.get(hint.holder)
        if w is None or w.role != "decode" or w.draining_since is not None:
            return None
        covered = min(hint.cached_tokens, len(req.prompt_token_ids)) / len(req.prompt_token_ids)
        if covered < self.local_prefill_threshold:
            return None
        self.local_prefills += 1
        return w

    async def _run_direct(
        self,
        req: GenerateRequest,
        dec: Worker,
        sampling: common_pb2.SamplingParams,
        structured: str,
        span: Span,
    ) -> AsyncGenerator[TokenEvent, None]:
        rid = req.request_id
        dec.in_flight += 1
        self.in_flight[rid] = (None, dec)
        decode = worker_pb2.DecodeRequest(
            request_id=rid,
            prompt_token_ids=req.prompt_token_ids,
            sampling=sampling,
            structured_json=structured,
            session_id=_session_id(req),
        )
        span.set("k2serve.decode_worker", dec.worker_id)
        events = self._stream_decode(req, dec, decode, span, cached_tokens=None, retry_if_no_tokens=True)
        try:
            async with contextlib.aclosing(events):
                async for ev in events:
                    yield ev
        finally:
            dec.in_flight -= 1
            self.in_flight[rid] = (None, None)

    async def _stream_decode(
        self,
        req: GenerateRequest,
        dec: Worker,
        decode: worker_pb2.DecodeRequest,
        parent: Span,
        *,
        cached_tokens: int | None,
        retry_if_no_tokens: bool,
    ) -> AsyncGenerator[TokenEvent, None]:
        """Stream `decode` from `dec` as TokenEvents until the finish (then `dec` counts a success).

        cached_tokens: the prompt tokens the prefill found cached, reported on every event; None when
        `dec` computes the prompt itself (a direct session turn) and each chunk reports its own count.
        retry_if_no_tokens: a transport failure of `dec`, or its removal, before any token arrived raises
        _Retryable (nothing reached the client, so another worker may serve the request); otherwise
        such failures end the stream (BackendFailure or the worker's error)."""
        rid = req.request_id
        n = len(req.prompt_token_ids)
        span = parent.child("router.decode", kind="client", attributes={"k2serve.worker": dec.worker_id})
        stream = dec.decode_stub.Decode(decode, metadata=span.metadata())
        produced = 0
        try:
            async for chunk in stream:
                produced += len(chunk.token_ids)
                reason = finish_from_proto(chunk.finish_reason) if chunk.finish_reason else None
                lps = [logprob_from_proto(m) for m in chunk.logprobs] or None
                by = dec.worker_id if reason is not None else None
                cached = chunk.num_cached_tokens if cached_tokens is None else cached_tokens
                yield TokenEvent(list(chunk.token_ids), reason, n, cached, lps, by)
                if reason is not None:
                    self.table.call_succeeded(dec)
                    span.set("k2serve.completion_tokens", produced)
                    return
        except grpc.aio.AioRpcError as e:
            span.fail(e)
            if e.code() in _TRANSPORT:
                self.table.call_failed(dec)
                if retry_if_no_tokens and produced == 0:
                    raise _Retryable(f"holder {dec.worker_id}: {e.code().name}", [dec.worker_id]) from e
            raise error_of(e, rid, f"decode on {dec.worker_id}") from e
        except asyncio.CancelledError as e:
            if _cancelled_by_caller():
                raise
            if retry_if_no_tokens and produced == 0:
                raise _Retryable(f"holder {dec.worker_id} was removed", [dec.worker_id]) from e
            raise BackendFailure(f"decode worker {dec.worker_id} was removed mid-stream", rid) from e
        finally:
            stream.cancel()
            span.end()
        raise BackendFailure(f"decode stream from {dec.worker_id} ended without a finish", rid)

    async def _prefill(
        self,
        req: GenerateRequest,
        sampling: common_pb2.SamplingParams,
        structured: str,
        exclude: frozenset[str],
        parent: Span,
        blocks: PromptBlocks,
    ) -> tuple[Worker, Worker, worker_pb2.ReserveResponse, worker_pb2.PrefillResponse]:
        rid = req.request_id
        route = parent.child("router.route")
        try:
            holder = (
                self.table.workers.get(req.session.holder) if req.session and req.session.holder else None
            )
            usable = holder is not None and holder.role == "decode" and holder.draining_since is None
            context = len(req.prompt_token_ids) + req.params.max_tokens
            if holder is not None and usable and holder.worker_id not in exclude and kv_fits(holder, context):
                to_dec = Choice(holder, "session")  # keep a session's context on one decode worker
            else:
                to_dec = self.policy.choose(
                    self.table.of_role("decode"), "decode", exclude, blocks, req.params.max_tokens
                )
            to_pre = self.policy.choose(self.table.of_role("prefill"), "prefill", exclude, blocks)
            pre, dec = to_pre.worker, to_dec.worker
            route.set("k2serve.prefill_worker", pre.worker_id)
            route.set("k2serve.decode_worker", dec.worker_id)
            route.set("k2serve.routing_reason", to_pre.reason)
            route.set("k2serve.predicted_cached_tokens", to_pre.cached_tokens)
        except NoWorkerError as e:
            route.fail(e)
            raise _Retryable(str(e), [], no_worker=e.role) from e
        finally:
            route.end()
        self._count_decision("decode", to_dec)
        self._count_decision("prefill", to_pre)
        uncached = len(req.prompt_token_ids) - to_pre.cached_tokens
        pre.in_flight += 1
        dec.in_flight += 1
        old = self.in_flight.get(rid, (None, None))
        for w in old:
            if w is not None:
                w.in_flight -= 1
        self.in_flight[rid] = (pre, dec)
        pre.prefill_tokens += uncached  # its queue as the router knows it, at once (a burst sees it)
        lease = _session_id(req) or self._lease_key(pre, blocks)
        self.policy.dispatched(pre, blocks)  # a next turn arriving meanwhile may wait for these blocks
        try:
            res, first = await self._reserve_and_prefill(
                req, sampling, structured, parent, blocks, pre, dec, lease
            )
        finally:
            pre.prefill_tokens -= uncached
            self.policy.settled(pre, blocks)
        pre.prefill_answered(first.prompts_computed, first.num_prompt_tokens - first.num_cached_tokens)
        if self.routing_log is not None:
            self.routing_log.write(json.dumps(routing_record(req.prompt_token_ids, to_pre, first)) + "\n")
            self.routing_log.flush()
        return pre, dec, res, first

    async def _reserve_and_prefill(
        self,
        req: GenerateRequest,
        sampling: common_pb2.SamplingParams,
        structured: str,
        parent: Span,
        blocks: PromptBlocks,
        pre: Worker,
        dec: Worker,
        lease: str,
    ) -> tuple[worker_pb2.ReserveResponse, worker_pb2.PrefillResponse]:
        """Reserve blocks on `dec`, then prefill on `pre` into them (see `_prefill`); `lease`: the
        session lease key `pre` leases the prompt's blocks under ("" for none)."""
        rid = req.request_id
        reserve = parent.child("router.reserve", kind="client", attributes={"k2serve.worker": dec.worker_id})
        try:
            with reserve:
                res = await dec.decode_stub.Reserve(
                    worker_pb2.ReserveRequest(
                        request_id=rid,
                        num_prompt_tokens=len(req.prompt_token_ids),
                        max_tokens=req.params.max_tokens,
                    ),
                    timeout=30,
                    metadata=reserve.metadata(),
                )
        except asyncio.CancelledError as e:
            if _cancelled_by_caller():
                raise
            raise _Retryable(f"reserve on {dec.worker_id}: the worker was removed", [dec.worker_id]) from e
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # the worker may reserve after all: free it
                self._background(dec.decode_stub.Abort(worker_pb2.AbortRequest(request_id=rid), timeout=5))
            if e.code() in _TRANSPORT:
                self.table.call_failed(dec)
                raise _Retryable(f"reserve on {dec.worker_id}: {e.code().name}", [dec.worker_id]) from e
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise QueueFullError(len(self.in_flight), self.max_in_flight) from e
            raise error_of(e, rid, f"reserve on {dec.worker_id}") from e
        target = worker_pb2.DecodeTarget(
            worker_id=dec.worker_id,
            endpoint=res.endpoint,
            transfer_id=res.transfer_id,
            block_ids=res.block_ids,
            block_size=res.block_size,
        )
        pre.prefilling += 1
        prefill = parent.child("router.prefill", kind="client", attributes={"k2serve.worker": pre.worker_id})
        try:
            with prefill:
                first = await pre.prefill_stub.Prefill(
                    worker_pb2.PrefillRequest(
                        request_id=rid,
                        prompt_token_ids=req.prompt_token_ids,
                        sampling=sampling,
                        decode_target=target,
                        structured_json=structured,
                        session_id=lease,
                    ),
                    metadata=prefill.metadata(),
                )
            self.table.call_succeeded(pre)
            self.bytes_transferred += first.bytes_sent
            if self.table.workers.get(pre.worker_id) is pre:  # not removed meanwhile (its index is gone)
                self.policy.prefilled(pre, blocks)
            return res, first
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await dec.decode_stub.Release(
                    worker_pb2.ReleaseRequest(transfer_id=res.transfer_id), timeout=5
                )
            if isinstance(e, asyncio.CancelledError):
                if _cancelled_by_caller():
                    raise
                raise _Retryable(
                    f"prefill on {pre.worker_id}: the worker was removed", [pre.worker_id]
                ) from e
            if e.code() == grpc.StatusCode.ABORTED:  # the KV transfer failed, not the prefill worker
                raise _Retryable(f"prefill on {pre.worker_id}: {e.details()}", []) from e
            if e.code() in _TRANSPORT:
                self.table.call_failed(pre)
                raise _Retryable(
                    f"prefill on {pre.worker_id}: {e.code().name}: {e.details()}", [pre.worker_id]
                ) from e
            raise error_of(e, rid, f"prefill on {pre.worker_id}") from e
        finally:
            pre.prefilling -= 1

    def _lease_key(self, pre: Worker, blocks: PromptBlocks) -> str:
        """The lease key of a request without a session id (`LeaseKeys`): its whole-history
        conversation's, when it continues one or its prompt's leading block is live in the KV index on
        any worker; "" otherwise (and for a worker that publishes no KV events or block size)."""
        size = pre.info.block_size
        if size <= 0 or not pre.info.publishes_kv_events:
            return ""
        hashes = blocks.hashes(size)
        matched = bool(hashes) and any(
            self.table.kv_index.holds(w, hashes[0]) for w in self.table.kv_index.workers()
        )
        return self.lease_keys.key_for(hashes, matched) or ""

    def _count_decision(self, role: str, choice: Choice) -> None:
        """Count a routing decision by role and reason (and a prefill worker's predicted cached tokens)."""
        choice.worker.routed += 1
        key = (role, choice.reason)
        self.routing_decisions[key] = self.routing_decisions.get(key, 0) + 1
        if role == "prefill":
            self.predicted_hit_tokens += choice.cached_tokens


def prompt_key(token_ids: Sequence[int]) -> str:
    """A short fingerprint of a prompt (its length and the CRC-32 of its token ids): how a client that
    kept its prompts finds a request's line in the --routing-log."""
    return f"{len(token_ids)}:{zlib.crc32(array.array('I', token_ids).tobytes()):08x}"


def routing_record(
    token_ids: Sequence[int], choice: Choice, first: worker_pb2.PrefillResponse
) -> dict[str, object]:
    """A --routing-log line: the prompt (`prompt_key`), the prefill worker chosen and why, the cached
    tokens predicted there and found, and every candidate as the policy scored it (`Candidate`: predicted
    TTFT, queued tokens, the prompt's tokens cached in its own tiers, in the shared store, and being
    computed by a prefill in flight there); `t`: wall-clock seconds when the answer came."""
    return {
        "t": time.time(),
        "prompt": prompt_key(token_ids),
        "worker": choice.worker.worker_id,
        "reason": choice.reason,
        "predicted_cached": choice.cached_tokens,
        "found_cached": first.num_cached_tokens,
        "candidates": [dataclasses.asdict(c) for c in choice.candidates],
    }


def _session_id(req: GenerateRequest) -> str:
    """The request's chat session id ("" without one): the lease key its workers use."""
    return req.session.session_id if req.session is not None else ""


def _cancelled_by_caller() -> bool:
    """Whether a CancelledError means this task is being cancelled (the client went away), rather than a
    worker call cancelled because its channel was closed when the worker was removed from the table."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _Retryable(Exception):
    """A failure before the first token that another worker may not have; `no_worker` is the role of
    which no (other) ready worker was left to try."""

    def __init__(self, message: str, worker_ids: list[str], no_worker: str | None = None) -> None:
        super().__init__(message)
        self.worker_ids = worker_ids
        self.no_worker = no_worker
