"""AsyncEngine: one LLMEngine stepped by a background thread, served to asyncio as a GenerationBackend.

Only the engine thread touches the LLMEngine. Callers (on any asyncio loop) hand it commands (add,
abort) through a locked inbox and receive TokenEvents on a per-request asyncio.Queue fed with
`loop.call_soon_threadsafe`. Validation, admission and grammar compilation run in the caller, so a
bad request fails in its own caller. A failure inside a step ends only the requests it can be pinned
on (all in-flight ones when it cannot be pinned), is logged, and the thread carries on.

With a lockstep group (`for_group`: a `LockstepGroup`, the expert-parallel `k2serve.experts.EPWorker`)
the thread calls the group's collective `step()` every iteration, with or without local work, waiting
~1 ms between steps while no rank has work (commands wake it at once). Losing the group
(`GroupLostError`) is fatal: every
in-flight request fails with BackendFailure, the thread stops and `on_fatal` tells the process,
which exits non-zero so that the launcher restarts the whole group.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from k2serve.chat.structured import GrammarCompiler, GrammarConstraint
from k2serve.chat.tokenizer import KimiTokenizer
from k2serve.engine.config import EngineConfig
from k2serve.engine.group import GroupLostError, LockstepGroup
from k2serve.engine.kv_reservation import KVGeometry, KVReservation
from k2serve.engine.kv_tiers import tier_stats
from k2serve.engine.llm_engine import LLMEngine, RequestOutput
from k2serve.engine.metrics import EngineMetrics, RequestTimes
from k2serve.engine.protocol import (
    BackendError,
    BackendFailure,
    BackendStats,
    DrainingError,
    GenerateRequest,
    InvalidRequestError,
    QueueFullError,
    TokenEvent,
)
from k2serve.engine.sequence import KVSink, RequestError
from k2serve.engine.validation import compile_structured, validate_request

logger = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_WAIT_S = 0.001  # between the steps of an idle expert-parallel group


@dataclass
class _Client:
    """The caller side of one request: where its events go."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent | BackendError]
    num_prompt_tokens: int
    times: RequestTimes
    observed: bool = True  # counted in the metrics (a worker's warm-up request is not traffic)


class _Unobserved:
    """EngineMetrics' per-request calls, doing nothing: for requests kept out of the metrics."""

    def prompt_computed(self, num_tokens: int) -> None:
        pass

    def tokens(self, times: RequestTimes, num_new: int) -> None:
        pass

    def finished(self, times: RequestTimes, reason: str, queue_time: float | None) -> None:
        pass


_UNOBSERVED = _Unobserved()


@dataclass(frozen=True)
class Prefilled:
    """A prompt computed elsewhere: its KV is in `block_table` (reserved here), `first_token_id` sampled."""

    first_token_id: int
    block_table: list[int]


@dataclass(frozen=True)
class _Add:
    """Admit `request` (its grammar already compiled); the hooks are `generate`'s."""

    request: GenerateRequest
    constraint: GrammarConstraint | None
    kv_sink: KVSink | None
    prefilled: Prefilled | None


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Call:
    """Run `fn(engine)` and settle `future` with its result or error."""

    fn: Callable[[LLMEngine], Any]
    future: concurrent.futures.Future[Any]


_Command = _Add | _Abort | _Call


class AsyncEngine:
    """The local GenerationBackend (see k2serve.engine.protocol for the contract).

    Lifecycle: `start()` launches the engine thread; `begin_drain()` refuses new requests
    (DrainingError) while in-flight ones go on; `await drain(timeout)` waits for them (aborting what
    is left after `timeout` seconds) and then stops the thread; `shutdown()` aborts everything in
    flight and stops the thread at once. Both always leave the thread stopped.

    `group`: the rank of a lockstep group (expert parallelism) whose `engine` this is (see the module
    docstring); stepping stops for every rank of the group when one rank's thread stops, so shutting one rank down makes
    the others lose the group. `on_fatal(error)` is called on the engine thread once the group is lost
    and every in-flight request has been failed; `fatal_error` keeps the error.

    `metrics` (an EngineMetrics labelled `role`, `engine_id`) is observed as tokens are delivered.
    """

    def __init__(
        self,
        engine: LLMEngine,
        model_name: str,
        group: LockstepGroup | None = None,
        on_fatal: Callable[[GroupLostError], None] | None = None,
        role: str = "serve",
        engine_id: str = "0",
    ) -> None:
        if engine.tokenizer is None:
            raise ValueError("AsyncEngine needs a model directory with a tokenizer (tiktoken.model)")
        if group is not None and group.engine is not engine:
            raise ValueError("AsyncEngine: `engine` must be the engine of `group`")
        if group is not None and (engine.leases is not None or engine.tiers is not None):
            # leases expire by each rank's clock and the tiers' files are per process: the ranks'
            # schedules (which must stay in lockstep) could diverge
            raise ValueError(
                "kv_session_lease_s, the kv_offload_* tiers and kv_store are not supported in an expert-parallel "
                "group yet"
            )
        self._engine = engine
        self._group = group
        self._on_fatal = on_fatal
        self._fatal: GroupLostError | None = None
        self._tokenizer: KimiTokenizer = engine.tokenizer
        self._model_name = model_name
        self._kv_geometry = engine.kv_geometry
        self._compiler: GrammarCompiler | None = None  # built on first use
        self._compiler_lock = threading.Lock()
        self._cond = threading.Condition()
        self._commands: list[_Command] = []
        self._clients: dict[str, _Client] = {}
        self._num_pending_adds = 0
        self._stats = BackendStats(0, 0, 0, engine.blocks.num_blocks, 0.0, 0)
        self._prompts_computed = 0  # BackendStats.prompts_computed (engine thread, under _cond)
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.metrics = EngineMetrics(model_name, role, engine_id, self.stats)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        config: EngineConfig | None = None,
        model_name: str | None = None,
        role: str = "serve",
        engine_id: str = "0",
    ) -> AsyncEngine:
        """Load a checkpoint directory; the model name defaults to the directory's name."""
        engine = LLMEngine.from_pretrained(model_dir, dtype, config)
        return cls(engine, model_name or Path(model_dir).resolve().name, role=role, engine_id=engine_id)

    @classmethod
    def for_group(
        cls,
        worker: LockstepGroup,
        model_name: str,
        on_fatal: Callable[[GroupLostError], None] | None = None,
        role: str = "serve",
        engine_id: str = "0",
    ) -> AsyncEngine:
        """Serve one expert-parallel rank: its own requests on `worker.engine`, lockstep with its group."""
        return cls(worker.engine, model_name, worker, on_fatal, role, engine_id)

    # ---- GenerationBackend ---------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def tokenizer(self) -> KimiTokenizer:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        """The engine's max_model_len (never more than its KV pool holds: a longer sequence could
        never run, even alone)."""
        return self._engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self._engine.model.config.vocab_size

    @property
    def kv_geometry(self) -> KVGeometry:
        """The shape of this engine's latent KV (fixed for its life: any thread may read it)."""
        return self._kv_geometry

    @property
    def config(self) -> EngineConfig:
        return self._engine.config

    @property
    def fatal_error(self) -> GroupLostError | None:
        """Why the engine thread stopped by itself (the expert-parallel group was lost), else None."""
        return self._fatal

    @property
    def engine(self) -> LLMEngine:
        """The wrapped engine. Only the engine thread may touch it while the thread runs."""
        return self._engine

    def check_admission(self) -> None:
        with self._cond:
            self._check_admission_locked()

    async def generate(
        self,
        request: GenerateRequest,
        kv_sink: KVSink | None = None,
        prefilled: Prefilled | None = None,
        observed: bool = True,
    ) -> AsyncIterator[TokenEvent]:
        """The GenerationBackend call, plus two hooks for disaggregated serving (k2serve.prefill/decode):
        `kv_sink(layer, kv)` receives each layer's whole-prompt latent as it is computed; `prefilled`
        continues a request whose prompt KV is already in blocks this engine reserved (`reserve_kv`) and
        whose first token was sampled elsewhere (that token is the first event). `observed` False keeps
        the request out of the metrics (a worker's warm-up)."""
        self.check_admission()
        self._validate(request)
        constraint = None
        if request.structured is not None:
            constraint = await asyncio.to_thread(self._compile, request.structured)
        client = _Client(
            asyncio.get_running_loop(),
            asyncio.Queue(),
            len(request.prompt_token_ids),
            RequestTimes(time.monotonic()),
            observed,
        )
        with self._cond:
            self._check_admission_locked()
            if self._thread is None or not self._thread.is_alive():
                raise BackendFailure("the engine thread is not running (call start())", request.request_id)
            if request.request_id in self._clients:
                raise InvalidRequestError(
                    f"request id {request.request_id!r} is already in flight",
                    "request_id",
                    request.request_id,
                )
            self._clients[request.request_id] = client
            self._commands.append(_Add(request, constraint, kv_sink, prefilled))
            self._num_pending_adds += 1
            self._cond.notify()
        return self._events(client)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread between steps and return its result (or raise its error).
        The only way for other threads to touch the engine. A caller cancelled before the engine thread
        took the call up cancels it (`fn` never runs); once it runs, it completes and its result is
        dropped (see `reserve_kv` for a result that must not be dropped)."""
        return await asyncio.wrap_future(self._submit(fn))

    def _submit(self, fn: Callable[[LLMEngine], T]) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if self._stopping or self._thread is None or not self._thread.is_alive():
                raise BackendFailure("the engine thread is not running", "")
            self._commands.append(_Call(fn, fut))
            self._cond.notify()
        return fut

    async def reserve_kv(self, num_tokens: int) -> KVReservation:
        """Blocks for `num_tokens` positions whose KV comes from elsewhere (see LLMEngine.reserve_kv;
        NoFreeBlocksError when the pool is short). Hand the table back through `generate(...,
        prefilled=Prefilled(first_token_id, reservation.block_table))` or `free_kv`. A caller cancelled
        while the engine thread reserves (an RPC past its deadline) leaks nothing: the blocks go back."""
        fut = self._submit(lambda engine: engine.reserve_kv(num_tokens))
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(self._free_unclaimed)
            raise

    def _free_unclaimed(self, fut: concurrent.futures.Future[KVReservation]) -> None:
        """A reservation whose caller was cancelled: return its blocks (on the engine thread)."""
        if fut.cancelled() or fut.exception() is not None:
            return
        table = fut.result().block_table
        with contextlib.suppress(BackendFailure):  # a stopped engine has freed its pool anyway
            self._submit(lambda engine: engine.free_kv(table))

    async def free_kv(self, block_table: list[int]) -> None:
        """Return a reserved block table that no request adopted; once asked, the blocks go back even
        when the caller is cancelled while it waits."""
        await asyncio.shield(asyncio.wrap_future(self._submit(lambda engine: engine.free_kv(block_table))))

    async def abort(self, request_id: str) -> None:
        with self._cond:
            if request_id in self._clients:
                self._commands.append(_Abort(request_id))
                self._cond.notify()

    def stats(self) -> BackendStats:
        with self._cond:
            return replace(self._stats, num_waiting=self._stats.num_waiting + self._num_pending_adds)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="k2serve-engine", daemon=True)
            self._thread.start()

    @property
    def is_draining(self) -> bool:
        return self._draining or self._stopping

    @property
    def num_in_flight(self) -> int:
        """Requests admitted whose final event has not been handed to their caller yet."""
        with self._cond:
            return len(self._clients)

    def begin_drain(self) -> None:
        """Refuse new requests from now on; in-flight ones continue."""
        with self._cond:
            self._draining = True

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (at most `timeout` s), then stop the thread."""
        self.begin_drain()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self.num_in_flight and (deadline is None or time.monotonic() < deadline):
                await asyncio.sleep(0.02)
        finally:
            await asyncio.to_thread(self.shutdown)

    def shutdown(self) -> None:
        """Abort whatever is in flight (callers get a final "abort" event), join the thread, then close
        the engine: its KV tiers' queued disk writes and store puts are finished, within a bounded time
        (LLMEngine.close), so that what was offloaded is not lost at exit."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._engine.close()

    # ---- caller side ---------------------------------------------------------------------------
    def _check_admission_locked(self) -> None:
        if self._draining or self._stopping:
            raise DrainingError()
        waiting = self._stats.num_waiting + self._num_pending_adds
        limit = self._engine.config.max_waiting
        if waiting >= limit:
            raise QueueFullError(waiting, limit)

    def _validate(self, request: GenerateRequest) -> None:
        """Everything that makes a request impossible here, named; raises InvalidRequestError."""
        validate_request(
            request.prompt_token_ids,
            request.params,
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
        )

    def _compile(self, structured: dict[str, Any]) -> GrammarConstraint | None:
        """A GrammarConstraint for a GenerateRequest.structured spec; raises InvalidRequestError."""
        with self._compiler_lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler(self._tokenizer)
        return compile_structured(self._compiler, structured)

    async def _events(self, client: _Client) -> AsyncIterator[TokenEvent]:
        """The caller's view: events in order, consecutive queued ones merged, ending at the final one."""
        while True:
            item = await client.queue.get()
            if isinstance(item, BackendError):
                raise item
            while item.finish_reason is None and not client.queue.empty():
                nxt = client.queue.get_nowait()
                if isinstance(nxt, BackendError):
                    yield item
                    raise nxt
                item = _merge(item, nxt)
            yield item
            if item.finish_reason is not None:
                return

    # ---- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._wait_for_work()
                    commands, self._commands = self._commands, []
                    self._apply(commands)
                    if self._stopping:
                        for rid in list(self._clients):
                            self._abort_locked(rid)
                        return
                    self._publish_stats()
                if self._group is not None or self._engine.has_unfinished_requests():
                    try:
                        self._step()
                    except GroupLostError as exc:
                        self._lose_group(exc)
                        return
        finally:
            with self._cond:
                self._stopping = True
                for rid, client in list(self._clients.items()):
                    self._send(client, BackendFailure("the engine thread stopped", rid))
                self._clients.clear()

    def _wait_for_work(self) -> None:
        """Alone: sleep until there is something to do. In a group: step again at once while any rank
        has work, else after IDLE_WAIT_S (or the next command), as every rank must keep stepping."""
        if self._group is None:
            while not (self._commands or self._stopping or self._engine.has_unfinished_requests()):
                self._cond.wait()
        elif not (self._group.any_work or self._commands or self._stopping):
            self._cond.wait(IDLE_WAIT_S)

    def _lose_group(self, exc: GroupLostError) -> None:
        """The group cannot step any more: fail everything in flight, then tell the process."""
        logger.error("expert-parallel group lost: %s", exc)
        with self._cond:
            self._fatal = exc
            self._stopping = True
            for rid, client in list(self._clients.items()):
                self._engine.abort_request(rid)
                self._send(client, BackendFailure(f"expert-parallel group lost: {exc}", rid))
            self._clients.clear()
        if self._on_fatal is not None:
            self._on_fatal(exc)

    def _apply(self, commands: list[_Command]) -> None:
        """Add and abort requests and run calls, in arrival order (lock held)."""
        for command in commands:
            match command:
                case _Abort(request_id):
                    self._abort_locked(request_id)
                case _Call(fn, future):
                    # a caller cancelled before now (an RPC's deadline) wants nothing run; once running,
                    # the future cannot be cancelled, so settling it below cannot raise InvalidStateError
                    if not future.set_running_or_notify_cancel():
                        continue
                    try:
                        result = fn(self._engine)
                    except Exception as e:  # noqa: BLE001 - handed to the caller
                        future.set_exception(e)
                    else:
                        future.set_result(result)
                case _Add():
                    self._add(command)

    def _add(self, command: _Add) -> None:
        request = command.request
        rid = request.request_id
        self._num_pending_adds -= 1
        client = self._clients.get(rid)
        if client is None:
            return
        waiting, limit = len(self._engine.scheduler.waiting), self._engine.config.max_waiting
        if waiting >= limit:  # preemptions refilled the queue since admission
            del self._clients[rid]
            self._send(client, QueueFullError(waiting, limit))
            return
        try:
            if command.prefilled is not None:
                p = command.prefilled
                client.times.last_token = time.monotonic()  # its first token came with it
                done = self._engine.add_prefilled_request(
                    rid,
                    request.prompt_token_ids,
                    p.first_token_id,
                    request.params,
                    p.block_table,
                    command.constraint,
                    session_id=request.session.session_id if request.session is not None else None,
                )
                if done is not None:  # the first token ended it; that token was emitted elsewhere
                    done.new_token_ids = []
                    self._deliver(done)
            else:
                self._engine.add_request(
                    rid,
                    request.prompt_token_ids,
                    request.params,
                    command.constraint,
                    command.kv_sink,
                    session_id=request.session.session_id if request.session is not None else None,
                )
        except (RequestError, ValueError, TypeError) as e:
            del self._clients[rid]
            self._send(client, InvalidRequestError(str(e), None, rid))

    def _abort_locked(self, request_id: str) -> None:
        self._engine.abort_request(request_id)
        client = self._clients.pop(request_id, None)
        if client is not None:
            self._metrics(client).finished(client.times, "abort", None)
            self._send(client, TokenEvent([], "abort", client.num_prompt_tokens, 0))

    def _step(self) -> None:
        """One step (the group's collective one in a group); a GroupLostError propagates (the group is lost)."""
        try:
            outputs = self._engine.step() if self._group is None else self._group.step()
        except GroupLostError:
            raise
        except Exception as exc:  # contained: the requests it hit get the error, the thread goes on
            logger.exception("engine step failed")
            self._recover(exc)
            return
        with self._cond:
            for out in outputs:
                self._deliver(out)
            self._publish_stats()

    def _metrics(self, client: _Client) -> EngineMetrics | _Unobserved:
        return self.metrics if client.observed else _UNOBSERVED

    def _deliver(self, out: RequestOutput) -> None:
        client = self._clients.get(out.request_id)
        if client is None:
            return
        new = list(out.new_token_ids)
        if new and client.times.last_token is None:  # the prompt was computed here
            self._metrics(client).prompt_computed(len(out.prompt_token_ids))
            self._prompts_computed += 1
        self._metrics(client).tokens(client.times, len(new))
        tail = out.logprobs[len(out.logprobs) - len(new) :] if out.logprobs else []
        logprobs = tail if tail and all(lp is not None for lp in tail) else None
        event = TokenEvent(
            new,
            out.finish_reason if out.finished else None,
            len(out.prompt_token_ids),
            out.num_cached_tokens,
            logprobs,
        )
        if out.finished:
            del self._clients[out.request_id]
            queue_time = out.metrics.queue_time if out.metrics is not None else None
            self._metrics(client).finished(client.times, out.finish_reason or "abort", queue_time)
        if not self._send(client, event) and not out.finished:
            self._engine.abort_request(out.request_id)  # nobody is listening any more
            del self._clients[out.request_id]
            self._metrics(client).finished(client.times, "abort", None)

    def _recover(self, exc: Exception) -> None:
        """End the requests a failed step can be blamed on: the unschedulable head of the queue for
        a RequestError with nothing running, otherwise every in-flight request."""
        with self._cond:
            sched = self._engine.scheduler
            if isinstance(exc, RequestError) and sched.waiting and not sched.running:
                victims = [sched.waiting[0].request_id]
            else:
                victims = list(self._engine.seqs)
            for rid in victims:
                self._engine.abort_request(rid)
                client = self._clients.pop(rid, None)
                if client is None:
                    continue
                if isinstance(exc, RequestError):
                    self._send(client, InvalidRequestError(str(exc), "prompt_token_ids", rid))
                else:
                    self._send(client, BackendFailure(f"engine step failed: {exc!r}", rid))
            self._publish_stats()

    def _publish_stats(self) -> None:
        sched, blocks = self._engine.scheduler, self._engine.blocks
        self._stats = BackendStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            kv_blocks_used=blocks.num_used_blocks,
            kv_blocks_total=blocks.num_blocks,
            prefix_hit_rate=blocks.prefix_hit_rate,
            num_preemptions=sched.num_preemptions,
            prefix_query_tokens=blocks.prefix_query_tokens,
            prefix_hit_tokens=blocks.prefix_hit_tokens,
            spec_num_drafts=self._engine.spec_stats.num_drafts,
            spec_num_draft_tokens=self._engine.spec_stats.num_draft_tokens,
            spec_num_accepted_tokens=self._engine.spec_stats.num_accepted_tokens,
            queued_prefill_tokens=self._engine.queued_prefill_tokens(),
            prefill_tokens_per_s=self._engine.prefill_tokens_per_s,
            prompts_computed=self._prompts_computed,
            decode_step_ms=self._engine.decode_step_ms,
            decode_step_batch=self._engine.decode_step_batch,
            kv_tiers=tier_stats(self._engine.tiers, self._engine.leases, self._engine.reloads),
        )

    @staticmethod
    def _send(client: _Client, item: TokenEvent | BackendError) -> bool:
        """Hand `item` to the caller's loop; False when that loop is closed (the caller is gone)."""
        try:
            client.loop.call_soon_threadsafe(client.queue.put_nowait, item)
        except RuntimeError:
            return False
        return True


def _merge(a: TokenEvent, b: TokenEvent) -> TokenEvent:
    logprobs = a.logprobs + b.logprobs if a.logprobs is not None and b.logprobs is not None else None
    return TokenEvent(
        a.token_ids + b.token_ids, b.finish_reason, b.num_prompt_tokens, b.num_cached_tokens, logprobs
    )
