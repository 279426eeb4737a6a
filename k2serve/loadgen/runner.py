"""The run loop: send requests at their arrival times (within a concurrency cap) and collect records."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

from k2serve.loadgen.client import Client
from k2serve.loadgen.dataset import BenchRequest, poisson_arrivals
from k2serve.loadgen.progress import Progress
from k2serve.loadgen.record import RequestRecord

DRAIN_GRACE_S = 5.0


class MissingArrivalError(ValueError):
    """Trace-timed arrivals asked for a request without an arrival time; `index` is the request."""

    def __init__(self, index: int) -> None:
        super().__init__(f"request {index} has no arrival time: give a request rate")
        self.index = index


@dataclass
class RunResult:
    """Records in completion order, the run's wall time (s) and why sending stopped
    ("num_prompts", "duration" or "dataset_end")."""

    records: list[RequestRecord]
    wall_s: float
    stopped_by: str


async def run_load(
    requests: Iterable[BenchRequest],
    client: Client,
    *,
    rate: float | None,
    num_prompts: int | None,
    duration_s: float | None,
    max_concurrency: int | None,
    seed: int,
    progress: Progress | None = None,
    drain_grace_s: float = DRAIN_GRACE_S,
) -> RunResult:
    """Send `requests` through `client`: at Poisson arrivals of `rate` requests/s (inf: at once), or at
    each request's `arrival_s` when `rate` is None; at most `max_concurrency` in flight. Sending stops
    after `num_prompts` requests, at `duration_s` s, or when `requests` ends; requests in flight then
    get the client's timeout plus `drain_grace_s` (s) to end and are cancelled after it, so the run is bounded."""
    if duration_s is None and num_prompts is None:
        raise ValueError("a run needs num_prompts or duration_s to be bounded")
    if rate is not None and math.isinf(rate) and max_concurrency is None and num_prompts is None:
        raise ValueError("an infinite rate without max_concurrency needs num_prompts")
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency is not None else None
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task[None]] = set()
    arrivals = poisson_arrivals(rate, seed) if rate is not None else None
    t0 = time.perf_counter()

    async def one(req: BenchRequest) -> None:
        start = time.perf_counter() - t0
        try:
            done = await client.send_all(req, t0)
        except asyncio.CancelledError:
            rec = Client.new_record(req, t0)
            rec.start_s = start
            rec.error, rec.error_detail = "cancelled", "still running when the run ended"
            rec.finish_s = time.perf_counter() - t0
            done = [rec]
        finally:
            if sem is not None:
                sem.release()
        records.extend(done)
        if progress is not None:
            progress.on_done(
                all(r.ok for r in done),
                any(r.rejected for r in done),
                sum(r.output_tokens or 0 for r in done),
            )

    async def send_all() -> str:
        """Send until a bound; returns what stopped it."""
        for sent, req in enumerate(requests):
            if num_prompts is not None and sent >= num_prompts:
                return "num_prompts"
            if arrivals is not None:
                at = next(arrivals)
            elif req.arrival_s is None:
                raise MissingArrivalError(req.index)
            else:
                at = req.arrival_s
            if duration_s is not None and at >= duration_s:
                return "duration"
            delay = at - (time.perf_counter() - t0)
            await asyncio.sleep(max(0.0, delay))  # yields to the requests in flight even when behind
            if sem is not None:
                left = None if duration_s is None else duration_s - (time.perf_counter() - t0)
                try:
                    async with asyncio.timeout(left):
                        await sem.acquire()
                except TimeoutError:
                    return "duration"
            if duration_s is not None and time.perf_counter() - t0 >= duration_s:
                if sem is not None:
                    sem.release()
                return "duration"
            task = asyncio.create_task(one(req))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if progress is not None:
                progress.on_sent()
        return "dataset_end"

    ticker = asyncio.create_task(progress.ticker()) if progress is not None else None
    try:
        stopped_by = await send_all()
        if tasks:
            await asyncio.wait(set(tasks), timeout=client.span_timeout_s + drain_grace_s)
    finally:  # past the drain, or on an error or cancellation: cancel what is left (recorded as cancelled)
        left = [t for t in tasks if not t.done()]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
    if progress is not None:
        progress.close()
    return RunResult(records, time.perf_counter() - t0, stopped_by)
