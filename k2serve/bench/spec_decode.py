"""`k2serve bench spec-decode`: batch-1 decode tok/s with and without ngram speculative decoding.

Two workloads on a preset checkpoint (random weights): "repeat", prompts the random model continues
repetitively (one token repeated, short phrases repeated: what it reproduces is what prompt lookup can
draft), and "no-repeat", random prompts (few drafts, mostly rejected: the cost of speculating for
nothing). Each round runs every prompt through both engines, alternating which goes first; the figures
are medians over rounds with their min..max, plus the acceptance the speculative engine saw. Greedy
output is checked equal between the two engines on every prompt (else the run fails).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def workloads(seed: int) -> dict[str, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    phrases = [torch.randint(0, 1000, (4,), generator=g).tolist() for _ in range(5)]
    return {
        "repeat": [[777] * 16, phrases[0] * 6, phrases[4] * 6],
        "no-repeat": [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (30, 24, 40)],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench spec-decode", description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seed", type=int, default=0, help="seed of the preset weights")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--prompt-lookup-max", type=int, default=4)
    ap.add_argument("--prompt-lookup-min", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from k2serve.engine.config import EngineConfig
    from k2serve.engine.llm import LLM
    from k2serve.engine.sampling_params import SamplingParams
    from k2serve.model.checkpoint import write_checkpoint

    spec = {
        "method": "ngram",
        "num_speculative_tokens": args.num_speculative_tokens,
        "prompt_lookup_max": args.prompt_lookup_max,
        "prompt_lookup_min": args.prompt_lookup_min,
    }
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp), args.preset, seed=args.seed, dtype=torch.float32)
        cfg = EngineConfig(num_kv_blocks=256, block_size=16, enable_prefix_caching=False)
        llms = {
            "plain": LLM(ckpt, engine_config=cfg),
            "spec": LLM(ckpt, engine_config=cfg, speculative_config=spec),
        }
        for llm in llms.values():  # warm-up
            llm.generate([[1, 2, 3, 1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        results: dict[str, Any] = {"config": vars(args), "speculative_config": spec, "workloads": {}}
        for name, prompts in workloads(args.seed).items():
            rates: dict[str, list[float]] = {"plain": [], "spec": []}
            stats = llms["spec"].engine.spec_stats
            before = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)
            for r in range(args.rounds):
                order = ["plain", "spec"] if r % 2 == 0 else ["spec", "plain"]
                tokens: dict[str, list[list[int]]] = {}
                for which in order:
                    tokens[which] = []
                    wall = 0.0
                    for p in prompts:  # batch 1: one request at a time
                        t = time.perf_counter()
                        out = llms[which].generate([p], params)[0]
                        wall += time.perf_counter() - t
                        tokens[which].append(out.token_ids)
                    rates[which].append(len(prompts) * args.output_len / wall)
                if tokens["plain"] != tokens["spec"]:
                    print(f"{name}: speculative output differs from plain greedy output", file=sys.stderr)
                    return 1
            drafts, draft_tokens, accepted = (
                now - then
                for now, then in zip(
                    (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens), before, strict=True
                )
            )
            speedups = [s / p for s, p in zip(rates["spec"], rates["plain"], strict=True)]
            results["workloads"][name] = {
                "plain_tok_s": rates["plain"],
                "spec_tok_s": rates["spec"],
                "median_plain_tok_s": statistics.median(rates["plain"]),
                "median_spec_tok_s": statistics.median(rates["spec"]),
                "median_speedup": statistics.median(speedups),
                "speedup_range": [min(speedups), max(speedups)],
                "acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
                "tokens_per_verify_step": 1 + accepted / drafts if drafts else 0.0,
                "draft_tokens": draft_tokens,
            }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"preset {args.preset}, batch 1, {args.output_len} tokens per request, {args.rounds} paired rounds")
    print(f"speculative_config {json.dumps(spec)}")
    print(
        "workload    plain tok/s (min..max)     spec tok/s (min..max)      speedup (min..max)   accept  tok/verify"
    )
    for name, w in results["workloads"].items():
        print(
            f"{name:10s}  {w['median_plain_tok_s']:7.1f} ({min(w['plain_tok_s']):.1f}..{max(w['plain_tok_s']):.1f})"
            f"   {w['median_spec_tok_s']:7.1f} ({min(w['spec_tok_s']):.1f}..{max(w['spec_tok_s']):.1f})"
            f"   {w['median_speedup']:.2f}x ({w['speedup_range'][0]:.2f}..{w['speedup_range'][1]:.2f})"
            f"   {w['acceptance_rate']:.2f}   {w['tokens_per_verify_step']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
