"""`k2serve bench kv-routing`: multi-turn whole-history conversations (no session ids) under each
`--routing-policy`, on clusters of several prefill workers.

Each policy gets its own cluster (router, `--prefill` prefill workers, one decode worker), so no policy
warms another's caches. `--conversations` conversations run at once, each turn resending the whole
history (previous prompt + a reply + new user tokens, the same tokens under every policy) with
max_tokens 1, so a request's latency is its time to first token. Turn t runs on every cluster before
turn t+1 anywhere, the policies in a rotated order each turn (paired, alternating rounds: load on the
machine falls on all alike).

Reported per policy: prompt tokens computed (prompt - cached, as the server reports them); reuse = cached
tokens / the best possible (every turn finding the previous turn's prompt, its full blocks, cached); and
TTFT over turns 2.. (median, with the 10th-90th percentile range).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from k2serve.bench import bench_model
from k2serve.cluster.local import ClusterSpec, LocalCluster
from k2serve.model.presets import PRESETS

POLICIES = ("kv", "least-loaded", "round-robin")


@dataclass(frozen=True)
class TurnResult:
    prompt_tokens: int
    cached_tokens: int
    best_cached_tokens: int  # the previous turn's prompt, in full blocks (0 on the first turn)
    ttft_s: float


def _spec(model: Path, args: argparse.Namespace, policy: str) -> ClusterSpec:
    return ClusterSpec(
        model_dir=str(model),
        port=0,
        grpc_port=0,
        num_prefill=args.prefill,
        num_decode=1,
        use_redis=False,
        dtype=args.dtype,
        engine_args=("--kv-cache-mb", str(args.kv_cache_mb), "--block-size", str(args.block_size)),
        router_args=("--routing-policy", policy),
        workdir=tempfile.mkdtemp(prefix=f"k2serve-bench-kv-routing-{policy}-"),
    )


def conversations(args: argparse.Namespace) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(first prompt of each conversation, tokens appended before each later turn: reply + user)."""
    rng = random.Random(args.seed)  # noqa: S311 (synthetic prompts)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1, 1000) for _ in range(n)]

    firsts = [tokens(args.first_tokens) for _ in range(args.conversations)]
    appends = [[tokens(args.reply_tokens + args.user_tokens) for _ in range(args.turns - 1)] for _ in firsts]
    return firsts, appends


async def _turn(client: httpx.AsyncClient, prompt: list[int]) -> tuple[int, float]:
    """(cached prompt tokens, seconds to the reply) of one max_tokens-1 completion."""
    t0 = time.perf_counter()
    r = await client.post(
        "/v1/completions",
        json={"prompt": prompt, "max_tokens": 1, "temperature": 0, "ignore_eos": True},
    )
    seconds = time.perf_counter() - t0
    r.raise_for_status()
    return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]), seconds


async def _round(url: str, prompts: list[list[int]]) -> list[tuple[int, float]]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return list(await asyncio.gather(*(_turn(client, p) for p in prompts)))


def run(model: Path, args: argparse.Namespace) -> dict[str, list[TurnResult]]:
    firsts, appends = conversations(args)
    results: dict[str, list[TurnResult]] = {p: [] for p in POLICIES}
    with contextlib.ExitStack() as stack:
        clusters = {p: stack.enter_context(LocalCluster(_spec(model, args, p))) for p in POLICIES}
        prompts = [list(f) for f in firsts]
        for t in range(args.turns):
            if t > 0:
                previous = prompts
                prompts = [p + a[t - 1] for p, a in zip(prompts, appends, strict=True)]
            best = (
                [0] * len(prompts)
                if t == 0
                else [len(p) // args.block_size * args.block_size for p in previous]
            )
            for policy in POLICIES[t % 3 :] + POLICIES[: t % 3]:
                outcome = asyncio.run(_round(clusters[policy].http_url, prompts))
                for p, b, (cached, seconds) in zip(prompts, best, outcome, strict=True):
                    results[policy].append(TurnResult(len(p), cached, b, seconds))
    return results


def report(results: dict[str, list[TurnResult]], conversations: int) -> list[str]:
    lines = ["policy         computed  reuse   TTFT ms turns 2.. median [p10, p90]"]
    for policy, turns in results.items():
        computed = sum(r.prompt_tokens - r.cached_tokens for r in turns)
        best = sum(r.best_cached_tokens for r in turns)
        reuse = sum(r.cached_tokens for r in turns) / best if best else 0.0
        later = [r.ttft_s * 1e3 for r in turns[conversations:]]
        deciles = statistics.quantiles(later, n=10) if len(later) > 1 else later * 9
        lines.append(
            f"{policy:13s} {computed:9d} {reuse:6.1%}   {statistics.median(later):8.1f} "
            f"[{deciles[0]:.1f}, {deciles[-1]:.1f}]"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench kv-routing", description=__doc__)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: write the preset)")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prefill", type=int, default=2, help="prefill workers per cluster")
    ap.add_argument("--conversations", type=int, default=4, help="conversations at once")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--first-tokens", type=int, default=256, help="first prompt of a conversation")
    ap.add_argument("--reply-tokens", type=int, default=32, help="the reply each turn adds to the history")
    ap.add_argument("--user-tokens", type=int, default=64, help="the user tokens each turn adds")
    ap.add_argument("--kv-cache-mb", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.turns < 2 or args.conversations < 1 or args.prefill < 1:
        ap.error("--turns must be >= 2, --conversations and --prefill >= 1")
    model = bench_model(args.model, args.preset, args.dtype)
    load = os.getloadavg()
    print(
        f"{model.name}: {args.conversations} whole-history conversations x {args.turns} turns, "
        f"{args.prefill} prefill workers, policies {', '.join(POLICIES)} alternating; "
        f"load average before {load[0]:.2f}",
        flush=True,
    )
    results = run(model, args)
    print("\n".join(report(results, args.conversations)))
    print(f"load average after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print("reproduce: k2serve bench kv-routing " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
