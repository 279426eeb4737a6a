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

`--kv-store none,mooncake` replays every policy also on a cluster whose prefill workers share a Mooncake
Store (its own `mooncake_master`; each prefill worker gives it `--kv-store-segment-mb`, the decode worker
none): hit tokens are then device + store hits, reported per tier from the prefill workers' metrics
(`k2serve_kv_tier_hit_tokens_total`), and the best possible at the same total capacity is one LRU of
the pools' blocks plus the store's (the framed blocks its segments hold by size, as the workers report
them: `kv_store_capacity_blocks`), beside the device-only best (the pools alone) of the clusters without
a store. The store's capacity by size is an upper bound of what it keeps: Mooncake allocates with
overhead and refuses or evicts (not in LRU order) near full; the bench says how many blocks the trace
sample has, which decides whether that matters.

`--trace-misses` has each router log its routing decisions (`--routing-log`) and charges every request's
shortfall against the best at the same total capacity to a cause (k2serve.bench.kv_misses: moved
away from its holder, its previous turn still in flight, a store miss, evicted, ...), printed per
request and summed per policy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
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
from k2serve.bench.kv_misses import Miss, lost_by_cause, miss_lines, trace_misses
from k2serve.cluster.local import ClusterSpec, LocalCluster, registered_workers
from k2serve.loadgen.dataset import BenchRequest
from k2serve.loadgen.http_client import HTTPClient
from k2serve.loadgen.record import RequestRecord
from k2serve.loadgen.runner import run_load
from k2serve.loadgen.stats import SLO, percentiles
from k2serve.loadgen.trace import (
    TraceEntry,
    TraceScaling,
    cacheable_blocks,
    ideal_cache_hits,
    read_trace,
    sample_conversations,
    trace_requests,
)
from k2serve.model.presets import PRESETS
from k2serve.router.policy import POLICIES as ROUTER_POLICIES

POLICIES = ("kv", "least-loaded", "round-robin")  # compared by default (any of the router's may be named)


STORES = ("none", "mooncake")  # --kv-store values: no shared tier, a Mooncake Store
ROUTING_LOG = "routing.jsonl"  # the router's --routing-log in its cluster's workdir (--trace-misses)


@dataclass(frozen=True)
class PolicyResult:
    """One policy's replay on one cluster: its records and the prefill workers' total KV blocks (and
    their shared store's, 0 without one)."""

    policy: str
    records: list[RequestRecord]
    capacity_blocks: int
    wall_s: float
    decisions: dict[str, int] = field(default_factory=dict)  # the router's prefill decisions by reason
    windows: list[tuple[int, int]] = field(default_factory=list)  # request index ranges of the windows
    kv_store: str = "none"
    store_capacity_blocks: int = 0
    tier_hits: dict[str, int] = field(default_factory=dict)  # prefill workers' hit tokens by tier
    routing: list[dict[str, Any]] = field(default_factory=list)  # the router's --routing-log lines


@dataclass(frozen=True)
class _Spec(ClusterSpec):
    """A ClusterSpec whose decode worker gets a KV pool of its own size (`decode_kv_cache_mb`): the
    prefill pools are what the replay measures, the decode pool only has to hold the requests in flight."""

    decode_kv_cache_mb: int = 16

    def worker_args(self, role: str, *args: Any, **kwargs: Any) -> list[str]:
        out = super().worker_args(role, *args, **kwargs)
        # the decode worker neither fetches prompts' blocks nor should fill the store with its own
        return (
            [*out, "--kv-cache-mb", str(self.decode_kv_cache_mb), "--kv-store", "none"]
            if role == "decode"
            else out
        )


def _spec(
    model: Path, args: argparse.Namespace, policy: str, prefill: int, store: str = "none"
) -> ClusterSpec:
    engine_args: tuple[str, ...] = (
        "--kv-cache-mb",
        str(args.kv_cache_mb),
        "--block-size",
        str(args.block_size),
    )
    if store == "mooncake":
        engine_args += ("--kv-store", "mooncake", "--kv-store-segment-mb", str(args.kv_store_segment_mb))
        engine_args += ("--kv-store-local-hostname", "127.0.0.1")
    workdir = tempfile.mkdtemp(prefix=f"k2serve-bench-kv-trace-{policy}-{store}-{prefill}-")
    router_args: tuple[str, ...] = ("--routing-policy", policy)
    if args.trace_misses:
        router_args += ("--routing-log", str(Path(workdir) / ROUTING_LOG))
    return _Spec(
        model_dir=str(model),
        port=0,
        grpc_port=0,
        num_prefill=prefill,
        num_decode=1,
        use_redis=False,
        dtype=args.dtype,
        engine_args=engine_args,
        router_args=router_args,
        workdir=workdir,
        decode_kv_cache_mb=args.decode_kv_cache_mb,
        mooncake_master=store == "mooncake",
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


def prefill_capacity(cluster: LocalCluster) -> tuple[int, int]:
    """(the prefill workers' KV pool blocks together, the blocks their shared-store segments hold by
    size together: 0 without a store), as registered."""
    prefill = [w for w in registered_workers(cluster.http_url, None) if w["role"] == "prefill"]
    return (
        sum(int(w["total_blocks"]) for w in prefill),
        sum(int(w.get("kv_store_capacity_blocks", 0)) for w in prefill),
    )


def tier_hit_tokens(cluster: LocalCluster) -> dict[str, int]:
    """The prefill workers' prefix-hit tokens by tier ("device", "mooncake", ...) together, from their
    metrics (`k2serve_kv_tier_hit_tokens_total`; empty for workers without any tier)."""
    out: Counter[str] = Counter()
    for w in registered_workers(cluster.http_url, None):
        if w["role"] != "prefill" or not w.get("metrics_url"):
            continue
        for family in text_string_to_metric_families(httpx.get(w["metrics_url"], timeout=10).text):
            for sample in family.samples:
                if sample.name == "k2serve_kv_tier_hit_tokens_total":
                    out[sample.labels["tier"]] += int(sample.value)
    return dict(out)


def run(
    model: Path, args: argparse.Namespace, requests: list[BenchRequest], prefill: int
) -> list[PolicyResult]:
    """Replay `requests` on one cluster per policy and store with `prefill` prefill workers (see the
    module doc)."""
    parts = windows(requests, args.rounds)
    configs = [(p, store) for store in args.kv_store for p in args.policies]
    records: dict[tuple[str, str], list[RequestRecord]] = {c: [] for c in configs}
    walls = dict.fromkeys(configs, 0.0)
    with contextlib.ExitStack() as stack:
        clusters = {
            c: stack.enter_context(LocalCluster(_spec(model, args, c[0], prefill, c[1]))) for c in configs
        }
        capacity = {c: prefill_capacity(cl) for c, cl in clusters.items()}
        for w, part in enumerate(parts):
            for config in configs[w % len(configs) :] + configs[: w % len(configs)]:
                recs, wall = asyncio.run(_replay(clusters[config].http_url, part, args.request_timeout))
                records[config] += recs
                walls[config] += wall
        decisions = {
            c: prefill_decisions(httpx.get(f"{cl.http_url}/metrics", timeout=10).text)
            for c, cl in clusters.items()
        }
        tiers = {c: tier_hit_tokens(cl) for c, cl in clusters.items()}
    routing = {c: read_routing_log(cl.dir / ROUTING_LOG) for c, cl in clusters.items()}
    spans = [(part[0].index, part[-1].index + 1) for part in parts]
    return [
        PolicyResult(
            c[0],
            records[c],
            capacity[c][0],
            walls[c],
            decisions[c],
            spans,
            kv_store=c[1],
            store_capacity_blocks=capacity[c][1],
            tier_hits=tiers[c],
            routing=routing[c],
        )
        for c in configs
    ]


def read_routing_log(path: Path) -> list[dict[str, Any]]:
    """The lines of a router's --routing-log ([] when it wrote none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    result: PolicyResult,
    blocks: Sequence[Sequence[tuple[int, int]]],
    block_size: int,
    slo: SLO,
    requests: Sequence[BenchRequest] = (),
) -> dict[str, Any]:
    """The figures of one policy's replay (see the module doc); `blocks`: the requests' scaled blocks;
    `requests` (with the result's routing log): each shortfall against the best and its cause."""
    ok = [r for r in result.records if r.ok]
    cached = sum(r.cached_tokens or 0 for r in ok)
    prompt = sum(r.prompt_len for r in ok)
    done = {r.index for r in ok}
    lru = ideal_cache_hits(blocks, block_size, result.capacity_blocks)  # the pools alone
    total = result.capacity_blocks + result.store_capacity_blocks
    lru_total = ideal_cache_hits(blocks, block_size, total) if result.store_capacity_blocks else lru
    unbounded = ideal_cache_hits(blocks, block_size, None)
    best_lru = sum(h for i, h in enumerate(lru) if i in done)
    best_total = sum(h for i, h in enumerate(lru_total) if i in done)
    best_inf = sum(h for i, h in enumerate(unbounded) if i in done)
    per_window = []
    for lo, hi in result.windows:
        best_w = sum(lru_total[i] for i in range(lo, hi) if i in done)
        if best_w:
            per_window.append(sum(r.cached_tokens or 0 for r in ok if lo <= r.index < hi) / best_w)
    ttfts = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
    good = sum(slo.met(r) for r in ok)
    p50, p99 = percentiles(ttfts, (50, 99)) if ttfts else (float("nan"), float("nan"))
    misses = trace_misses(requests, result.records, lru_total, result.routing) if result.routing else []
    return {
        "policy": result.policy,
        "kv_store": result.kv_store,
        "requests": len(result.records),
        "failed": len(result.records) - len(ok),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "tier_hit_tokens": result.tier_hits,
        "capacity_blocks": result.capacity_blocks,
        "store_capacity_blocks": result.store_capacity_blocks,
        "best_lru_tokens": best_lru,  # one LRU of the pools' blocks (the device-only best)
        "best_total_tokens": best_total,  # one LRU of the pools' and the store's blocks
        "best_unbounded_tokens": best_inf,
        "of_best_lru": cached / best_lru if best_lru else None,
        "of_best_total": cached / best_total if best_total else None,
        "of_unbounded": cached / best_inf if best_inf else None,
        # of the best at the same total capacity, per window (caches carry over: not independent)
        "of_best_lru_by_window": per_window,
        "goodput_fraction": good / len(result.records) if result.records else None,
        "goodput_per_s": good / result.wall_s if result.wall_s else None,
        "ttft_p50_ms": p50,
        "ttft_p99_ms": p99,
        "errors": dict(Counter(r.error or "unfinished" for r in result.records if not r.ok)),
        "prefill_decisions": result.decisions,
        "lost_by_cause": lost_by_cause(misses),
        "misses": [dataclasses.asdict(m) for m in misses],
    }


def report(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per row: "best total" is the best at the row's total capacity (pools + store), "best
    dev" the device-only best (the pools alone), the same for a row without a store."""
    lines = [
        "prefill policy        store     hit tokens  best total (cap blocks)  of best  best dev  of dev  "
        "unbounded  of unb.  goodput       TTFT p50 / p99 ms  failed"
    ]
    for r in rows:
        cap = r["capacity_blocks"] + r["store_capacity_blocks"]
        lines.append(
            f"{r['prefill']:7d} {r['policy']:13s} {r['kv_store']:9s} {r['cached_tokens']:10d} "
            f"{r['best_total_tokens']:10d} ({cap:6d})   {_pct(r['of_best_total']):>7} "
            f"{r['best_lru_tokens']:9d} {_pct(r['of_best_lru']):>6} {r['best_unbounded_tokens']:10d}  "
            f"{_pct(r['of_unbounded']):>6}  {_pct(r['goodput_fraction']):>6} "
            f"{r['goodput_per_s']:.2f}/s  {r['ttft_p50_ms']:8.1f} / {r['ttft_p99_ms']:8.1f}  {r['failed']}"
            + (f" {r['errors']}" if r["errors"] else "")
            + (f"  hits by tier {r['tier_hit_tokens']}" if r["tier_hit_tokens"] else "")
            + f"  decisions {r['prefill_decisions']}"
            + f"  of best total by window {[_pct(x) for x in r['of_best_lru_by_window']]}"
            + (f"  lost by cause {r['lost_by_cause']}" if r.get("lost_by_cause") else "")
        )
    return lines


def miss_report(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per row with traced misses: its requests that fell short of the best, and why (`kv_misses`)."""
    lines = []
    for r in rows:
        if r.get("misses"):
            lines.append(f"misses of {r['policy']} / {r['kv_store']} with {r['prefill']} prefill workers:")
            lines += miss_lines([Miss(**m) for m in r["misses"]])
    return lines


def distinct_blocks(blocks: Sequence[Sequence[tuple[int, int]]], block_size: int) -> int:
    """How many distinct cacheable blocks the requests have (an ideal cache this large misses nothing
    but first uses)."""
    return len({h for b in blocks for h in cacheable_blocks(b, block_size)})


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
    ap.add_argument(
        "--kv-store",
        type=lambda x: tuple(x.split(",")),
        default=("none",),
        help="shared KV tier of the prefill workers, comma-separated to compare (each its own clusters, "
        "paired): none, mooncake (a Mooncake Store on a local mooncake_master; needs "
        "pip install 'k2serve[mooncake]')",
    )
    ap.add_argument(
        "--kv-store-segment-mb",
        type=int,
        default=16,
        help="memory each prefill worker gives the store, MiB (Mooncake's minimum segment is 16 MiB)",
    )
    ap.add_argument(
        "--trace-misses",
        action="store_true",
        help="log the routers' decisions (--routing-log) and print, per request short of the best, why "
        "(moved from its holder, previous turn in flight, store miss, evicted, ...)",
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
    if (
        not args.kv_store
        or not set(args.kv_store) <= set(STORES)
        or len(set(args.kv_store)) < len(args.kv_store)
    ):
        ap.error(f"--kv-store must name some of {', '.join(STORES)} once each, got {','.join(args.kv_store)}")
    if "mooncake" in args.kv_store and args.kv_store_segment_mb < 16:
        ap.error(
            f"--kv-store-segment-mb must be >= 16 (Mooncake's minimum segment), got {args.kv_store_segment_mb}"
        )
    entries = load_entries(args, scaling)
    requests = list(trace_requests(entries, scaling, args.seed))
    blocks = [scaling.scaled_blocks(e) for e in entries]
    model = bench_model(args.model, args.preset, args.dtype)
    span = requests[-1].arrival_s or 0.0
    print(
        f"{model.name}: {len(requests)} requests of {args.conversations or 'all'} conversations from "
        f"{Path(args.trace).name}, {sum(len(r.prompt) for r in requests)} prompt tokens, replayed over "
        f"{span:.0f} s in {args.rounds} windows; {distinct_blocks(blocks, args.block_size)} distinct "
        f"cacheable blocks; prefill workers {prefills}; shared store {','.join(args.kv_store)}; load average before "
        f"{os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)",
        flush=True,
    )
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    rows = []
    for n in prefills:
        for result in run(model, args, requests, n):
            rows.append({"prefill": n, **summarize(result, blocks, args.block_size, slo, requests)})
        latest = rows[-len(args.policies) * len(args.kv_store) :]
        print("\n".join(report(latest) + miss_report(latest)), flush=True)
    print("\n".join(report(rows)))
    print(f"load average after {os.getloadavg()[0]:.2f}")
    print("reproduce: k2serve bench kv-trace " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
