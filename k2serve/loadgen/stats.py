"""Statistics of a run from its RequestRecords: percentiles, throughput, goodput under SLOs, prefix-cache
hit ratios, errors. Pure functions of the records; latencies are reported in ms, rates per second."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from k2serve.loadgen.record import RequestRecord

QUANTILES = (50.0, 90.0, 99.0)


@dataclass(frozen=True)
class SLO:
    """Service-level objectives (ms); None leaves that latency unconstrained."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"SLO {name} must be > 0 ms, got {v}")

    @property
    def set(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def met(self, r: RequestRecord) -> bool:
        """A successful request within both limits (TPOT is unconstrained for a 1-token output)."""
        if not r.ok:
            return False
        ttft, tpot = r.ttft_s, r.tpot_s
        if self.ttft_ms is not None and (ttft is None or ttft * 1e3 > self.ttft_ms):
            return False
        return self.tpot_ms is None or tpot is None or tpot * 1e3 <= self.tpot_ms


def percentiles(values: Sequence[float], qs: Sequence[float] = QUANTILES) -> list[float]:
    """Linearly interpolated percentiles (numpy's default) of a non-empty sequence."""
    if not values:
        raise ValueError("percentiles of an empty sequence")
    return [float(x) for x in np.percentile(np.asarray(values, dtype=np.float64), qs)]


def latency_summary(values_s: Sequence[float]) -> dict[str, float | int | None]:
    """`{"n", "mean", "p50", "p90", "p99", "max"}` in ms (None when there are no values)."""
    if not values_s:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99 = (round(x * 1e3, 3) for x in percentiles(values_s))
    return {
        "n": len(values_s),
        "mean": round(float(np.mean(values_s)) * 1e3, 3),
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "max": round(max(values_s) * 1e3, 3),
    }


def in_flight_curve(records: Sequence[RequestRecord]) -> tuple[list[float], list[int]]:
    """Requests in flight as a step function: (times s, count from that time on), starting at (0, 0)."""
    events = sorted(
        [(r.start_s, 1) for r in records] + [(r.finish_s, -1) for r in records if r.finish_s is not None],
        key=lambda e: (e[0], e[1]),  # a finish before a start at the same instant
    )
    times, counts, n = [0.0], [0], 0
    for t, d in events:
        n += d
        times.append(t)
        counts.append(n)
    return times, counts


def summarize(records: Sequence[RequestRecord], warmup_s: float, slo: SLO, trace: bool) -> dict[str, Any]:
    """The run's statistics. Requests that ended before `warmup_s` (s from the run start) are left out;
    rates are over the window from the end of warm-up (the run start when none) to the last end.

    Throughput counts successful requests; goodput those meeting the SLO (its fraction is over every
    measured request, failed ones included). The measured prefix-cache hit ratio is cached / prompt
    tokens over successful requests; the best one (trace runs) is what an infinite cache would hold
    for the same requests, with every request before them in the trace sent.
    """
    measured = [r for r in records if r.finish_s is not None and r.finish_s >= warmup_s]
    ok = [r for r in measured if r.ok]
    failed = [r for r in measured if not r.ok]
    start = warmup_s
    end = max((r.finish_s for r in measured if r.finish_s is not None), default=start)
    window = end - start

    def rate(x: float) -> float | None:
        return round(x / window, 4) if window > 0 else None

    prompt_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens or 0 for r in ok)
    with_usage = [r for r in ok if r.cached_tokens is not None]
    usage_prompt = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in with_usage)
    cached = sum(r.cached_tokens or 0 for r in with_usage)
    best = sum(r.best_cached_tokens for r in with_usage)
    good = [r for r in measured if slo.met(r)]
    return {
        "counts": {
            "sent": len(records),
            "measured": len(measured),
            "excluded_warmup": len(records) - len(measured),
            "completed": len(ok),
            "failed": sum(not r.rejected for r in failed),
            "rejected": sum(r.rejected for r in failed),
            "output_len_mismatch": sum(r.output_tokens != r.requested_output_len for r in ok),
            "without_usage": len(ok) - len(with_usage),
            "output_tokens": output_tokens,
            "output_chunks": sum(len(r.chunk_s) for r in ok),
        },
        "errors": dict(sorted(Counter(r.error for r in failed if not r.rejected and r.error).items())),
        "rejections": dict(sorted(Counter(r.error for r in failed if r.rejected and r.error).items())),
        "window_s": round(window, 4),
        "throughput": {
            "requests_per_s": rate(len(ok)),
            "input_tokens_per_s": rate(prompt_tokens),
            "output_tokens_per_s": rate(output_tokens),
        },
        "latency_ms": {
            "ttft": latency_summary([x for r in ok if (x := r.ttft_s) is not None]),
            "tpot": latency_summary([x for r in ok if (x := r.tpot_s) is not None]),
            "itl": latency_summary([x for r in ok for x in r.itl_s]),
            "e2e": latency_summary([x for r in ok if (x := r.e2e_s) is not None]),
        },
        "goodput": {
            "slo_ttft_ms": slo.ttft_ms,
            "slo_tpot_ms": slo.tpot_ms,
            "requests_per_s": rate(len(good)),
            "fraction": round(len(good) / len(measured), 4) if measured else None,
        }
        if slo.set
        else None,
        "prefix_cache": {
            "prompt_tokens": usage_prompt,
            "cached_tokens": cached,
            "measured_hit_ratio": round(cached / usage_prompt, 4) if usage_prompt else None,
            "best_cached_tokens": best if trace else None,
            "best_hit_ratio": round(best / usage_prompt, 4) if trace and usage_prompt else None,
        },
    }


def turn_summary(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """Tool-loop runs: per turn index (from 0), over the conversations that reached it: how many
    completed, TTFT (ms), mean prompt and cached tokens, cached / prompt tokens, mean body size and
    tool calls. What sessions and previous_response_id save shows here, turn by turn."""
    turns = sorted({r.turn for r in records if r.turn is not None})
    out = []
    for k in turns:
        at = [r for r in records if r.turn == k]
        ok = [r for r in at if r.ok]
        prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
        cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]

        def mean(xs: Sequence[int]) -> float | None:
            return round(float(np.mean(xs)), 2) if xs else None

        out.append(
            {
                "turn": k,
                "sent": len(at),
                "completed": len(ok),
                "ttft": latency_summary([x for r in ok if (x := r.ttft_s) is not None]),
                "prompt_tokens_mean": mean(prompt),
                "cached_tokens_mean": mean(cached),
                "hit_ratio": round(sum(cached) / sum(prompt), 4) if sum(prompt) and cached else None,
                "body_bytes_mean": mean([r.body_bytes for r in ok if r.body_bytes is not None]),
                "tool_calls": sum(r.tool_calls or 0 for r in ok),
            }
        )
    return out
