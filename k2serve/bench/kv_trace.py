"""`k2serve bench kv-trace`: a Mooncake trace replayed under each `--routing-policy` on local clusters
with several prefill workers, against the best possible prefix reuse at the same total cache size.

The trace (a sample of its conversations, `--conversations`, whole and in trace order) is scaled to fit
(`--trace-scale`: lengths and the 512-token hash block, so a hash id becomes one `--block-size` block
of deterministic token ids and shared hash ids become shared token blocks; `--time-scale`: arrivals).
Each policy gets its own cluster (router, N prefill workers, one decode worker) per prefill count, so no
policy warms another's caches. The trace is cut into `--rounds` windows of consecutive requests; window
w is replayed on every cluster (at its own timestamps, relative to the window's first) before window
w+1 anywhere, the policies in a rotated order each window (paired, alternating rounds: load on the
machine falls on all alike); a cluster's caches carry over from one window to the next.

Reported per policy and prefill count: prefix-hit tokens (as the server reports them) against the best
possible at the same total capacity (an ideal single LRU cache of all prefill workers' KV blocks
together, `k2serve.loadgen.trace.ideal_cache_hits`) and against the unbounded cache; goodput (requests
meeting `--slo-ttft-ms` and `--slo-tpot-ms`, per second and as a fraction); TTFT p50 / p99.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from k2serve.bench import bench_model
from k2serve.cluster.local import ClusterSpec, LocalCluster, registered_workers
from k2serve.loadgen.dataset import BenchRequest
from k2serve.loadgen.http_client import HTTPClient
from k2serve.loadgen.record import RequestRecord
from k2serve.loadgen.runner import run_load
from k2serve.loadgen.stats import SLO, percentiles
from k2serve.loadgen.trace import (
    TraceEntry,
    TraceScaling,
    ideal_cache_hits,
    read_trace,
    sample_conversations,
    trace_requests,
)
from k2serve.model.presets import PRESETS
from k2serve.router.policy import POLICIES as ROUTER_POLICIES

POLICIES = ("kv", "least-loaded", "round-robin")  # compared by default (any of the router's may be named)


@dataclass(frozen=True)
class PolicyResult:
    """One policy's replay on one cluster: its records and the prefill workers' total KV blocks."""

    policy: str
    records: list[RequestRecord]
    capacity_blocks: int
    wall_s: float
    decisions: dict[str, int] = field(default_factory=dict)  # the router's prefill decisions by reason
    windows: list[tuple[int, int]] = field(default_factory=list)  # request index ranges of the windows


@dataclass(frozen=True)
class _Spec(ClusterSpec):
    """A ClusterSpec whose decode worker gets a KV pool of its own size (`decode_kv_cache_mb`): the
    prefill pools are what the replay measures, the decode pool only has to hold the requests in flight."""

    decode_kv_cache_mb: int = 16

    def worker_args(self, role: str, *args: Any, **kwargs: Any) -> list[str]:
        out = super().worker_args(role, *args, **kwargs)
        return [*out, "--kv-cache-mb", str(self.decode_kv_cache_mb)] if role == "decode" else out


def _spec(model: Path, args: argparse.Namespace, policy: str, prefill: int) -> ClusterSpec:
    return _Spec(
        model_dir=str(model),
        port=0,
        grpc_port=0,
        num_prefill=prefill,
        num_decode=1,
        use_redis=False,
        dtype=args.dtype,
        engine_args=("--kv-cache-mb", str(args.kv_cache_mb), "--block-size", str(args.block_size)),
        router_args=("--routing-policy", policy),
        workdir=tempfile.mkdtemp(prefix=f"k2serve-bench-kv-trace-{policy}-{prefill}-"),
        decode_kv_cache_mb=args.decode_kv_cache_mb,
    )


def load_entries(args: argparse.Namespace, scaling: TraceScaling) -> list[TraceEntry]:
    """The replayed entries: `--conversations` sampled conversations of the first `--limit` lines, of
    those whose every request (scaled prompt + output) fits `--max-context` tokens (a worker's pool)."""
    entries = read_trace(args.trace, limit=args.limit)
    if args.conversations:

        def fits(e: TraceEntry) -> bool:
            return sum(n for _, n in scaling.scaled_blocks(e)) + scaling.output_len(e) <= args.max_context

        entries = sample_conversations(entries, args.conversations, args.seed, fits=fits)
    return entries[: args.num_prompts] if args.num_prompts else entries


def windows(requests: Sequence[BenchRequest], rounds: int) -> list[list[BenchRequest]]:
    """`rounds` windows of consecutive requests (sizes differing by at most one), each with its arrival
    offsets made relative to its first request."""
    n = len(requests)
    cuts = [round(i * n / rounds) for i in range(rounds + 1)]
    out = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        part = list(requests[a:b])
        if part:
            t0 = part[0].arrival_s or 0.0
            out.append([replace(r, arrival_s=(r.arrival_s or 0.0) - t0) for r in part])
    return out


async def _replay(
    url: str, requests: list[BenchRequest], timeout_s: float
) -> tuple[list[RequestRecord], float]:
    client = HTTPClient(url, None, None, timeout_s, 0.0)
    t0 = time.perf_counter()
    try:
        result = await run_load(
            requests,
            client,
            rate=None,
            num_prompts=len(requests),
            duration_s=None,
            max_concurrency=None,
            seed=0,
        )
    finally:
        await client.aclose()
    return result.records, time.perf_counter() - t0


def prefill_capacity_blocks(cluster: LocalCluster) -> int:
    """The prefill workers' KV blocks together (as registered)."""
    return sum(
        int(w["total_blocks"]) for w in registered_workers(cluster.http_url, None) if w["role"] == "prefill"
    )


def run(
    model: Path, args: argparse.Namespace, requests: list[BenchRequest], prefill: int
) -> list[PolicyResult]:
    """Replay `requests` on one cluster per policy with `prefill` prefill workers (see the module doc)."""
    parts = windows(requests, args.rounds)
    policies = args.policies
    records: dict[str, list[RequestRecord]] = {p: [] for p in policies}
    walls = dict.fromkeys(policies, 0.0)
    with contextlib.ExitStack() as stack:
        clusters = {p: stack.enter_context(LocalCluster(_spec(model, args, p, prefill))) for p in policies}
        capacity = {p: prefill_capacity_blocks(c) for p, c in clusters.items()}
        for w, part in enumerate(parts):
            for policy in policies[w % len(policies) :] + policies[: w % len(policies)]:
                recs, wall = asyncio.run(_replay(clusters[policy].http_url, part, args.request_timeout))
                records[policy] += recs
                walls[policy] += wall
        decisions = {
            p: prefill_decisions(httpx.get(f"{c.http_url}/metrics", timeout=10).text)
            for p, c in clusters.items()
        }
    spans = [(part[0].index, part[-1].index + 1) for part in parts]
    return [PolicyResult(p, records[p], capacity[p], walls[p], decisions[p], spans) for p in policies]


def prefill_decisions(metrics: str) -> dict[str, int]:
    """The router's prefill routing decisions by reason, from its Prometheus text, and under
    "predicted_hit_tokens" / "found_hit_tokens" the cached tokens its KV index predicted on the chosen
    prefill workers against those the workers found (a prediction above what was found: a stale index,
    or blocks evicted between the decision and the prefill)."""
    out: dict[str, int] = {}
    totals = {
        "k2serve_router_predicted_hit_tokens_total": "predicted_hit_tokens",
        "k2serve_router_prefill_cached_tokens_total": "found_hit_tokens",
    }
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name in totals:
                out[totals[sample.name]] = int(sample.value)
            elif (
                sample.name == "k2serve_router_routing_decisions_total"
                and sample.labels.get("role") == "prefill"
            ):
                out[sample.labels["reason"]] = int(sample.value)
    return out


def summarize(
    result: PolicyResult, blocks: Sequence[Sequence[tuple[int, int]]], block_size: int, slo: SLO
) -> dict[str, Any]:
    """The figures of one policy's replay (see the module doc); `blocks`: the requests' scaled blocks."""
    ok = [r for r in result.records if r.ok]
    cached = sum(r.cached_tokens or 0 for r in ok)
    prompt = sum(r.prompt_len for r in ok)
    done = {r.index for r in ok}
    lru = ideal_cache_hits(blocks, block_size, result.capacity_blocks)
    unbounded = ideal_cache_hits(blocks, block_size, None)
    best_lru = sum(h for i, h in enumerate(lru) if i in done)
    best_inf = sum(h for i, h in enumerate(unbounded) if i in done)
    per_window = []
    for lo, hi in result.windows:
        best_w = sum(lru[i] for i in range(lo, hi) if i in done)
        if best_w:
            per_window.append(sum(r.cached_tokens or 0 for r in ok if lo <= r.index < hi) / best_w)
    ttfts = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
    good = sum(slo.met(r) for r in ok)
    p50, p99 = percentiles(ttfts, (50, 99)) if ttfts else (float("nan"), float("nan"))
    return {
        "policy": result.policy,
        "requests": len(result.records),
        "failed": len(result.records) - len(ok),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "capacity_blocks": result.capacity_blocks,
        "best_lru_tokens": best_lru,
        "best_unbounded_tokens": best_inf,
        "of_best_lru": cached / best_lru if best_lru else None,
        "of_unbounded": cached / best_inf if best_inf else None,
        "of_best_lru_by_window": per_window,  # caches carry over, so windows are not independent
        "goodput_fraction": good / len(result.records) if result.records else None,
        "goodput_per_s": good / result.wall_s if result.wall_s else None,
        "ttft_p50_ms": p50,
        "ttft_p99_ms": p99,
        "errors": dict(Counter(r.error or "unfinished" for r in result.records if not r.ok)),
        "prefill_decisions": result.decisions,
    }


def report(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "prefill policy        hit tokens  best LRU (cap blocks)  of best  unbounded  of unb.  "
        "goodput       TTFT p50 / p99 ms  failed"
    ]
    for r in rows:
        lines.append(
            f"{r['prefill']:7d} {r['policy']:13s} {r['cached_tokens']:10d} {r['best_lru_tokens']:9d} "
            f"({r['capacity_blocks']:5d})   {_pct(r['of_best_lru']):>7} {r['best_unbounded_tokens']:10d}  "
            f"{_pct(r['of_unbounded']):>6}  {_pct(r['goodput_fraction']):>6} "
            f"{r['goodput_per_s']:.2f}/s  {r['ttft_p50_ms']:8.1f} / {r['ttft_p99_ms']:8.1f}  {r['failed']}"
            + (f" {r['errors']}" if r["errors"] else "")
            + f"  decisions {r['prefill_decisions']}"
            + f"  of best by window {[_pct(x) for x in r['of_best_lru_by_window']]}"
        )
    return lines


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench kv-trace", description=__doc__)
    ap.add_argument("--trace", required=True, help="Mooncake trace JSONL (e.g. conversation_trace.jsonl)")
    ap.add_argument("--limit", type=int, default=None, help="read only the first N trace lines")
    ap.add_argument(
        "--conversations", type=int, default=12, help="sampled conversations (0: the leading requests)"
    )
    ap.add_argument("--num-prompts", type=int, default=None, help="replay at most N requests")
    ap.add_argument(
        "--max-context",
        type=int,
        default=1000,
        help="sample only conversations whose every request (scaled prompt + output tokens) fits this: "
        "a worker's KV pool holds a request whole (1 MiB of the tiny fp32 model: 1072 tokens)",
    )
    ap.add_argument("--trace-scale", type=float, default=1 / 32, help="lengths and hash block times X")
    ap.add_argument("--time-scale", type=float, default=0.02, help="arrivals at timestamp * X")
    ap.add_argument("--prefill", default="2,4", help="prefill workers per cluster, comma-separated")
    ap.add_argument("--rounds", type=int, default=2, help="trace windows, alternating the policies")
    ap.add_argument(
        "--policies",
        type=lambda x: tuple(x.split(",")),
        default=POLICIES,
        help=f"routing policies compared, comma-separated (default {','.join(POLICIES)})",
    )
    ap.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=200.0)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: write the preset)")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache-mb", type=int, default=1, help="KV pool of each prefill worker, MiB")
    ap.add_argument("--decode-kv-cache-mb", type=int, default=16, help="KV pool of the decode worker, MiB")
    ap.add_argument("--block-size", type=int, default=16, help="server block size = 512 * --trace-scale")
    ap.add_argument("--vocab-size", type=int, default=1000, help="prompt token ids in [0, N)")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--result-json", default=None)
    args = ap.parse_args(argv)
    scaling = TraceScaling(args.time_scale, args.trace_scale, vocab_size=args.vocab_size)
    if scaling.scaled_block_size != args.block_size:
        ap.error(
            f"--trace-scale {args.trace_scale} makes {scaling.scaled_block_size}-token hash blocks but "
            f"--block-size is {args.block_size}: they must match for shared hash ids to share server blocks"
        )
    prefills = [int(x) for x in args.prefill.split(",")]
    if args.rounds < 1 or min(prefills) < 1:
        ap.error("--rounds and every --prefill count must be >= 1")
    if not args.policies or not set(args.policies) <= set(ROUTER_POLICIES):
        ap.error(f"--policies must name some of {', '.join(ROUTER_POLICIES)}, got {','.join(args.policies)}")
    entries = load_entries(args, scaling)
    requests = list(trace_requests(entries, scaling, args.seed))
    blocks = [scaling.scaled_blocks(e) for e in entries]
    model = bench_model(args.model, args.preset, args.dtype)
    span = requests[-1].arrival_s or 0.0
    print(
        f"{model.name}: {len(requests)} requests of {args.conversations or 'all'} conversations from "
        f"{Path(args.trace).name}, {sum(len(r.prompt) for r in requests)} prompt tokens, replayed over "
        f"{span:.0f} s in {args.rounds} windows; prefill workers {prefills}; load average before "
        f"{os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)",
        flush=True,
    )
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    rows = []
    for n in prefills:
        for result in run(model, args, requests, n):
            rows.append({"prefill": n, **summarize(result, blocks, args.block_size, slo)})
        print("\n".join(report(rows[-len(args.policies) :])), flush=True)
    print("\n".join(report(rows)))
    print(f"load average after {os.getloadavg()[0]:.2f}")
    print("reproduce: k2serve bench kv-trace " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
