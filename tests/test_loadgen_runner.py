"""The run loop against a scripted client (no server): counts, concurrency cap, rates, the duration
bound, trace arrival times, and cancellation of requests still running when the run must end."""

from __future__ import annotations

import asyncio
import io
import time

import pytest

from k2serve.loadgen.client import Client
from k2serve.loadgen.dataset import BenchRequest, random_requests
from k2serve.loadgen.progress import Progress
from k2serve.loadgen.record import RequestRecord
from k2serve.loadgen.runner import MissingArrivalError, RunResult, run_load


class ScriptedClient(Client):
    """Answers every request after `delay_s`, one chunk per output token; tracks requests in flight."""

    def __init__(self, delay_s: float, timeout_s: float = 5.0) -> None:
        super().__init__(timeout_s)
        self.delay_s = delay_s
        self.in_flight = self.max_in_flight = 0

    async def send(self, req: BenchRequest, t0: float) -> RequestRecord:
        rec = self.new_record(req, t0)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        now = time.perf_counter() - t0
        rec.first_token_s = now
        rec.chunk_s = [now] * req.output_len
        rec.output_tokens = req.output_len
        rec.finish_s = now
        return rec


def run(client: Client, requests: object = None, **kw: object) -> RunResult:
    reqs = requests if requests is not None else random_requests(0, (2, 4), (1, 3), 100)
    args: dict = {
        "rate": float("inf"),
        "num_prompts": None,
        "duration_s": None,
        "max_concurrency": None,
        "seed": 0,
    }
    args.update(kw)
    return asyncio.run(run_load(reqs, client, **args))  # type: ignore[arg-type]


def test_num_prompts_at_infinite_rate() -> None:
    client = ScriptedClient(0.02)
    result = run(client, num_prompts=30)
    assert len(result.records) == 30 and result.stopped_by == "num_prompts"
    assert sorted(r.index for r in result.records) == list(range(30))
    assert client.max_in_flight == 30 and all(r.ok for r in result.records)


def test_max_concurrency_caps_requests_in_flight() -> None:
    client = ScriptedClient(0.02)
    result = run(client, num_prompts=20, max_concurrency=3)
    assert len(result.records) == 20 and client.max_in_flight == 3
    assert result.wall_s >= 20 / 3 * 0.02 * 0.9  # 7 rounds of 20 ms at least


def test_duration_stops_a_closed_loop() -> None:
    client = ScriptedClient(0.01)
    result = run(client, duration_s=0.3, max_concurrency=2)
    assert result.stopped_by == "duration" and result.wall_s < 2.0
    assert 10 <= len(result.records) <= 62  # 2 clients, 10 ms each, over 0.3 s
    assert max(r.start_s for r in result.records) < 0.3


def test_poisson_rate_paces_arrivals() -> None:
    result = run(ScriptedClient(0.0), num_prompts=20, rate=100.0)
    starts = sorted(r.start_s for r in result.records)
    assert 0.1 < starts[-1] < 0.6  # 19 gaps of 10 ms on average


def test_trace_arrival_times_are_kept_and_missing_ones_refused() -> None:
    reqs = [BenchRequest(i, (1, 2), 1, arrival_s=0.05 * i) for i in range(5)]
    result = run(ScriptedClient(0.0), reqs, rate=None, num_prompts=5)
    assert result.stopped_by == "dataset_end"
    for r in result.records:
        assert r.start_s == pytest.approx(0.05 * r.index, abs=0.03)
    cut = run(ScriptedClient(0.0), reqs, rate=None, num_prompts=5, duration_s=0.12)
    assert cut.stopped_by == "duration" and len(cut.records) == 3  # arrivals 0, 0.05, 0.10
    with pytest.raises(MissingArrivalError) as info:
        run(ScriptedClient(0.0), [BenchRequest(7, (1,), 1)], rate=None, num_prompts=1)
    assert info.value.index == 7


def test_requests_outliving_the_timeout_are_cancelled_and_recorded() -> None:
    client = ScriptedClient(delay_s=30.0, timeout_s=0.1)  # a client that ignores its own timeout
    t = time.perf_counter()
    result = run(client, num_prompts=3, drain_grace_s=0.1)
    assert time.perf_counter() - t < 5.0
    assert [r.error for r in result.records] == ["cancelled"] * 3
    assert all(r.finish_s is not None and not r.ok for r in result.records)


def test_unbounded_runs_are_refused() -> None:
    with pytest.raises(ValueError, match="bounded"):
        run(ScriptedClient(0.0))
    with pytest.raises(ValueError, match="max_concurrency"):
        run(ScriptedClient(0.0), duration_s=1.0)


def test_progress_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(total=5, duration_s=None, stream=out, interval_s=0.02)
    asyncio.run(
        run_load(
            random_requests(0, (2, 2), (1, 1), 10), ScriptedClient(0.1), rate=float("inf"), num_prompts=5,
            duration_s=None, max_concurrency=None, seed=0, progress=progress,
        )
    )  # fmt: skip
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and "\r" not in out.getvalue()  # ticks while the requests run, then the end
    assert "in flight 5" in lines[0]
    assert "sent 5/5  done 5  in flight 0  failed 0  rejected 0" in lines[-1]
