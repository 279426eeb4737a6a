"""The dry-run: replay a Mooncake trace through a queueing model of the cluster, with the planner in
the loop (through a `VirtualConnector`), and record the replica timeline.

The model, stepped every `step_s` seconds of simulated time:
- Prefill: one FIFO queue; each ready prefill replica computes one prompt at a time at
  `prefill_tokens_per_s` (no prefix cache: every prompt token is computed). A request's first token
  comes when its prefill ends (TTFT = queueing + compute).
- Decode: a prefilled request waits FIFO for a ready decode replica with room (fewer than
  `decode_max_batch` sequences and `decode_kv_tokens` free for its prompt + output, reserved at
  admission as the decode worker does). A replica with b sequences gives each one token every
  `decode_itl_base_s + decode_itl_per_seq_s * b` seconds (the inter-token latency); the wait for
  admission counts as one long inter-token gap.
- Scaling: a replica the planner adds serves `startup_s` later; a removed one drains (takes nothing
  new, finishes what it holds); the newest go first, as in a StatefulSet.
Every `interval_s` the planner sees an Observation of the same shape the router's metrics give
(latency quantiles over the interval from histograms with the router's buckets) and decides.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from k2serve.loadgen.trace import TraceEntry
from k2serve.planner.config import ROLES, SimParams
from k2serve.planner.connector import VirtualConnector, apply
from k2serve.planner.observation import Histogram, Observation, RoleLoad
from k2serve.planner.policy import Planner

# The router's latency buckets (k2serve.api.metrics), seconds; +inf is implied.
ROUTER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class TimelineRow:
    """The replica targets from `time_s` (simulated seconds since the trace start) on, and why."""

    time_s: float
    prefill: int
    decode: int
    reason: str

    def format(self) -> str:
        return f"{self.time_s:9.1f} s  prefill {self.prefill:3d}  decode {self.decode:3d}  {self.reason}"


@dataclass(frozen=True)
class SimResult:
    """timeline: the start and every change. ttft_s: every finished prefill's TTFT (arrival order of
    completion). itl: the whole run's inter-token latency histogram. replica_s: replica-seconds per role
    (starting and draining ones included: what they cost). at_max: observations per role on which the
    planner wanted more but held at the maximum. rejected: requests whose prompt + output
    exceed one decode replica's KV (the router would answer 429). unfinished: requests still open when
    the run stopped (`max_tail_s` after the last arrival)."""

    timeline: list[TimelineRow]
    requests: int
    rejected: int
    unfinished: int
    ttft_s: list[float]
    itl: Histogram
    replica_s: dict[str, float]
    at_max: dict[str, int]
    end_s: float

    def summary(self, ttft_slo_s: float, quantile: float) -> str:
        ttft = sorted(self.ttft_s)

        def pct(q: float) -> str:
            return f"{ttft[min(len(ttft) - 1, int(q * len(ttft)))]:.2f} s" if ttft else "-"

        within = sum(1 for x in ttft if x <= ttft_slo_s) / len(ttft) if ttft else 0.0
        itl_q = self.itl.quantile(quantile)
        return (
            f"{self.requests} requests over {self.end_s:.0f} s simulated, {self.rejected} rejected, "
            f"{self.unfinished} unfinished; "
            f"TTFT p50 {pct(0.5)} p90 {pct(0.9)} p99 {pct(0.99)}, {within:.1%} within {ttft_slo_s:g} s; "
            f"ITL p{round(quantile * 100)} {'-' if itl_q is None else f'{itl_q * 1e3:.0f} ms'}; "
            f"replica-hours prefill {self.replica_s['prefill'] / 3600:.2f} "
            f"decode {self.replica_s['decode'] / 3600:.2f}; {len(self.timeline) - 1} changes; held at the "
            f"maximum on {self.at_max['prefill']} (prefill) / {self.at_max['decode']} (decode) decisions"
        )


class _Buckets:
    """A cumulative-histogram accumulator with the router's bounds; weighted observations."""

    def __init__(self) -> None:
        self.counts = [0.0] * (len(ROUTER_BUCKETS) + 1)

    def observe(self, value: float, weight: float = 1.0) -> None:
        self.counts[bisect_left(ROUTER_BUCKETS, value)] += weight

    def histogram(self) -> Histogram:
        bounds = (*ROUTER_BUCKETS, math.inf)
        total, out = 0.0, []
        for b, c in zip(bounds, self.counts, strict=True):
            total += c
            out.append((b, total))
        return Histogram(tuple(out))


@dataclass
class _Request:
    arrival: float
    input_len: int
    output_len: int
    prefilled_at: float = 0.0


@dataclass
class _Replica:
    ready_at: float
    draining: bool = False
    current: _Request | None = None  # prefill: the prompt being computed
    left: float = 0.0  # prefill: its tokens still to compute
    progress: float = 0.0  # decode: tokens each running sequence has got so far (shared counter)
    seqs: list[tuple[float, int, int]] = field(default_factory=list)  # decode heap: (done at, id, kv)
    kv: int = 0  # decode: tokens reserved

    def busy(self) -> bool:
        return self.current is not None or bool(self.seqs)


class Simulation:
    """One replay; `run()` steps it to the end. Planner state lives in `planner`."""

    def __init__(
        self,
        entries: Sequence[TraceEntry],
        planner: Planner,
        params: SimParams,
        initial: tuple[int, int] = (1, 1),
        time_scale: float = 1.0,
        max_tail_s: float = 3600.0,
    ) -> None:
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(f"time_scale must be a finite number > 0, got {time_scale}")
        self.p = params
        self.planner = planner
        fit = [e for e in entries if e.input_length + e.output_length <= params.decode_kv_tokens]
        self.rejected = len(entries) - len(fit)
        self.requests = [
            _Request(e.timestamp_ms / 1000 * time_scale, e.input_length, e.output_length) for e in fit
        ]
        last = self.requests[-1].arrival if self.requests else 0.0
        self.stop_at = last + max_tail_s
        self.connector = VirtualConnector({"prefill": initial[0], "decode": initial[1]})
        self.replicas: dict[str, list[_Replica]] = {r: [] for r in ROLES}
        self.prefill_queue: deque[_Request] = deque()
        self.decode_queue: deque[_Request] = deque()
        self.ttft: list[float] = []
        self.itl_all = _Buckets()
        self.window = {"ttft": _Buckets(), "itl": _Buckets()}
        self.replica_s = dict.fromkeys(ROLES, 0.0)
        self.at_max = dict.fromkeys(ROLES, 0)
        self.finished = 0
        self._seq = 0
        self.now = 0.0
        self._reconcile(ready_at=0.0)
        self.timeline = [TimelineRow(0.0, initial[0], initial[1], "start")]

    # ---- replicas --------------------------------------------------------------------------------
    def _reconcile(self, ready_at: float) -> None:
        for role in ROLES:
            want = self.connector.replicas(role)
            reps = self.replicas[role]
            active = [r for r in reps if not r.draining]
            for _ in range(want - len(active)):
                reps.append(_Replica(ready_at=ready_at))
            for r in active[::-1][: max(0, len(active) - want)]:  # newest first
                r.draining = True
            self.replicas[role] = [r for r in reps if not (r.draining and r.ready_at > self.now)]

    # ---- one step --------------------------------------------------------------------------------
    def _prefill_step(self, t0: float, t1: float) -> None:
        rate = self.p.prefill_tokens_per_s
        for r in self.replicas["prefill"]:
            if r.ready_at > t0:
                continue
            clock = t0
            while True:
                if r.current is None:
                    if r.draining or not self.prefill_queue or self.prefill_queue[0].arrival >= t1:
                        break
                    r.current = self.prefill_queue.popleft()
                    r.left = r.current.input_len
                    clock = max(clock, r.current.arrival)
                if clock + r.left / rate > t1:
                    r.left -= (t1 - clock) * rate
                    break
                clock += r.left / rate
                req, r.current = r.current, None
                req.prefilled_at = clock
                self.ttft.append(clock - req.arrival)
                self.window["ttft"].observe(clock - req.arrival)
                if req.output_len > 1:
                    self.decode_queue.append(req)
                else:
                    self.finished += 1
        self.replicas["prefill"] = [r for r in self.replicas["prefill"] if not (r.draining and not r.busy())]

    def _decode_step(self, t0: float, t1: float) -> None:
        p = self.p
        open_reps = [r for r in self.replicas["decode"] if r.ready_at <= t0 and not r.draining]
        while self.decode_queue and self.decode_queue[0].prefilled_at < t1:
            req = self.decode_queue[0]
            need = req.input_len + req.output_len
            fits = [
                r for r in open_reps if len(r.seqs) < p.decode_max_batch and r.kv + need <= p.decode_kv_tokens
            ]
            if not fits:
                break  # FIFO: the head waits for room
            r = min(fits, key=lambda x: len(x.seqs))
            self.decode_queue.popleft()
            gap = max(0.0, t0 - req.prefilled_at) + p.itl(len(r.seqs) + 1)
            self.itl_all.observe(gap)
            self.window["itl"].observe(gap)
            self._seq += 1
            heapq.heappush(r.seqs, (r.progress + req.output_len - 1, self._seq, need))
            r.kv += need
        dt = t1 - t0
        for r in self.replicas["decode"]:
            if r.ready_at > t0 or not r.seqs:
                continue
            itl = p.itl(len(r.seqs))
            tokens = dt / itl  # per sequence this step
            self.itl_all.observe(itl, tokens * len(r.seqs))
            self.window["itl"].observe(itl, tokens * len(r.seqs))
            r.progress += tokens
            while r.seqs and r.seqs[0][0] <= r.progress:
                _, _, kv = heapq.heappop(r.seqs)
                r.kv -= kv
                self.finished += 1
        self.replicas["decode"] = [r for r in self.replicas["decode"] if not (r.draining and not r.busy())]

    # ---- the planner -----------------------------------------------------------------------------
    def observation(self) -> Observation:
        pre, dec = self.replicas["prefill"], self.replicas["decode"]
        ready_dec = [r for r in dec if r.ready_at <= self.now]
        cap = len(ready_dec) * self.p.decode_kv_tokens
        busy_pre = sum(1 for r in pre if r.current is not None)
        running = sum(len(r.seqs) for r in dec)
        q = self.planner.config.quantile
        return Observation(
            prefill=RoleLoad(
                replicas=self.connector.replicas("prefill"),
                ready=sum(1 for r in pre if r.ready_at <= self.now and not r.draining),
                in_flight=busy_pre + len(self.prefill_queue),
                running=busy_pre,
                waiting=len(self.prefill_queue),
            ),
            decode=RoleLoad(
                replicas=self.connector.replicas("decode"),
                ready=sum(1 for r in ready_dec if not r.draining),
                in_flight=running + len(self.decode_queue),
                running=running,
                waiting=len(self.decode_queue),
                kv_used=sum(r.kv for r in ready_dec) / cap if cap else None,
            ),
            ttft_s=self.window["ttft"].histogram().quantile(q),
            itl_s=self.window["itl"].histogram().quantile(q),
            window_s=self.p.interval_s,
        )

    def _plan(self) -> None:
        decision = self.planner.decide(self.observation(), self.now)
        self.window = {"ttft": _Buckets(), "itl": _Buckets()}
        for role in ROLES:
            self.at_max[role] += decision.role(role).reason.startswith("hold at the maximum")
        if apply(decision, self.connector):
            self._reconcile(ready_at=self.now + self.p.startup_s)
            c = self.connector
            self.timeline.append(
                TimelineRow(self.now, c.replicas("prefill"), c.replicas("decode"), decision.reason)
            )

    def run(self, on_row: Callable[[TimelineRow], None] | None = None) -> SimResult:
        """Step until every request has finished (or `max_tail_s` after the last arrival). `on_row` sees
        each timeline row as it happens, the final "end" row included."""
        if on_row is not None:
            on_row(self.timeline[0])
        arrivals = iter(self.requests)
        pending = next(arrivals, None)
        step, interval = self.p.step_s, self.p.interval_s
        steps_per_obs = max(1, round(interval / step))
        k = 0
        while self.finished < len(self.requests) and self.now < self.stop_at:
            t0, t1 = self.now, self.now + step
            while pending is not None and pending.arrival < t1:
                self.prefill_queue.append(pending)
                pending = next(arrivals, None)
            self._prefill_step(t0, t1)
            self._decode_step(t0, t1)
            for role in ROLES:
                self.replica_s[role] += step * len(self.replicas[role])
            k += 1
            self.now = k * step
            if k % steps_per_obs == 0:
                rows = len(self.timeline)
                self._plan()
                if on_row is not None and len(self.timeline) > rows:
                    on_row(self.timeline[-1])
        end = TimelineRow(
            self.now, self.connector.replicas("prefill"), self.connector.replicas("decode"), "end"
        )
        if on_row is not None:
            on_row(end)
        return SimResult(
            timeline=self.timeline,
            requests=len(self.requests) + self.rejected,
            rejected=self.rejected,
            unfinished=len(self.requests) - self.finished,
            ttft_s=self.ttft,
            itl=self.itl_all.histogram(),
            replica_s=self.replica_s,
            at_max=self.at_max,
            end_s=self.now,
        )
