"""`k2serve bench kv-history`: multi-turn tool-loop conversations whose history reaches a cluster as the
whole history in every request (no session id, as the OpenAI and Anthropic SDKs send it) against k2serve
agent sessions (`session_id`, only the new messages), under `--routing-policy kv` on local clusters with
several prefill workers: how much of the reuse sessions get does whole-history traffic keep?

Each history mode gets its own cluster (router with its Redis, `--prefill` prefill workers, one decode
worker), so neither warms the other's caches. `--rounds` rounds, each `--conversations` new tool-loop
conversations at once (`k2serve bench serve --agent-turns`, the same seeded conversations in both modes),
the modes in alternating order round by round (paired, alternating rounds: load falls on both alike).

Reported per mode: prompt and cached tokens of turns 2.. (cached as the server reports them, summed);
reuse = cached / prompt tokens; and whole-history reuse / session reuse (the issue's goal: >= 90%).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from k2serve.bench import bench_model
from k2serve.cluster.local import ClusterSpec, LocalCluster
from k2serve.loadgen.benchmark import run_benchmark
from k2serve.loadgen.config import BenchConfig
from k2serve.model.presets import PRESETS

MODES = ("session", "resend")


def _spec(model: Path, args: argparse.Namespace, mode: str) -> ClusterSpec:
    engine_args: tuple[str, ...] = (
        "--kv-cache-mb",
        str(args.kv_cache_mb),
        "--block-size",
        str(args.block_size),
    )
    if args.kv_session_lease_s:
        engine_args += ("--kv-session-lease-s", str(args.kv_session_lease_s))
    return ClusterSpec(
        model_dir=str(model),
        port=0,
        grpc_port=0,
        num_prefill=args.prefill,
        num_decode=1,
        use_redis=True,
        dtype=args.dtype,
        engine_args=engine_args,
        router_args=("--routing-policy", "kv"),
        workdir=tempfile.mkdtemp(prefix=f"k2serve-bench-kv-history-{mode}-"),
    )


def _config(url: str, args: argparse.Namespace, mode: str, seed: int) -> BenchConfig:
    return BenchConfig(
        url=url,
        endpoint="/v1/chat/completions",
        agent_turns=args.turns,
        history=mode,
        num_prompts=args.conversations,
        max_concurrency=args.conversations,
        request_rate=float("inf"),
        input_len=(args.user_words, args.user_words),
        output_len=(args.max_tokens, args.max_tokens),
        tool_result_len=args.tool_result_words,
        seed=seed,
        request_timeout_s=300.0,
        progress_interval_s=600.0,
    )


def reuse(requests: list[dict[str, Any]]) -> tuple[int, int]:
    """(prompt tokens, cached tokens) of the successful turns after each conversation's first."""
    later = [r for r in requests if (r.get("turn") or 0) > 0 and r.get("error") is None]
    return sum(r.get("prompt_tokens") or 0 for r in later), sum(r.get("cached_tokens") or 0 for r in later)


def run(model: Path, args: argparse.Namespace) -> dict[str, list[tuple[int, int]]]:
    """Per mode, (prompt, cached) tokens of turns 2.. of each round."""
    out: dict[str, list[tuple[int, int]]] = {m: [] for m in MODES}
    with contextlib.ExitStack() as stack:
        clusters = {m: stack.enter_context(LocalCluster(_spec(model, args, m))) for m in MODES}
        for r in range(args.rounds):
            for mode in MODES[r % 2 :] + MODES[: r % 2]:
                result = run_benchmark(_config(clusters[mode].http_url, args, mode, args.seed + r), "")
                out[mode].append(reuse(result["requests"]))
    return out


def report(results: dict[str, list[tuple[int, int]]]) -> list[str]:
    lines = ["mode      prompt tokens  cached tokens  reuse   per round"]
    ratios = {}
    for mode, rounds in results.items():
        prompt, cached = sum(p for p, _ in rounds), sum(c for _, c in rounds)
        ratios[mode] = cached / prompt if prompt else 0.0
        per = ", ".join(f"{c / p:.1%}" if p else "-" for p, c in rounds)
        lines.append(f"{mode:9s} {prompt:13d} {cached:14d}  {ratios[mode]:6.1%}  [{per}]")
    if ratios["session"]:
        lines.append(f"whole-history reuse / session reuse: {ratios['resend'] / ratios['session']:.1%}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench kv-history", description=__doc__)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: write the preset)")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prefill", type=int, default=2, help="prefill workers per cluster")
    ap.add_argument("--conversations", type=int, default=4, help="conversations at once, per round")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--user-words", type=int, default=24, help="words of each new user message")
    ap.add_argument("--tool-result-words", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--kv-cache-mb", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-session-lease-s", type=float, default=0.0, help="workers' session leases (0: off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--result-json", default=None)
    args = ap.parse_args(argv)
    if args.turns < 2 or args.conversations < 1 or args.prefill < 1 or args.rounds < 1:
        ap.error("--turns must be >= 2; --conversations, --prefill and --rounds >= 1")
    model = bench_model(args.model, args.preset, args.dtype)
    print(
        f"{model.name}: {args.rounds} rounds of {args.conversations} tool-loop conversations x {args.turns} "
        f"turns, {args.prefill} prefill workers, kv routing; modes {', '.join(MODES)} alternating; load "
        f"average before {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)",
        flush=True,
    )
    results = run(model, args)
    print("\n".join(report(results)))
    print(f"load average after {os.getloadavg()[0]:.2f}")
    print("reproduce: k2serve bench kv-history " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
