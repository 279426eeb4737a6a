"""Where a speculative decoding step's time goes: one `k2serve bench spec-decode --workload agent` round
on one engine with per-step timers (the main thread's CPU time, `time.thread_time`; torch runs on 1
thread), no profiler. Timed: the proposer (`Proposer.propose`, and inside it the suffix trees' catch-up
`SuffixCache._sync` and `speculate`), the model forward (`ModelRunner.run`, split by the step's
token count: prefill, or 1 + d tokens for a decode row with d drafts), the verification of a row's
drafts (`LLMEngine._verify`: acceptance, stop checks, KV roll-back), the plain rows' sampling
(`_postprocess`) and the cyclic garbage collector. Also prints how many drafts each verification
had and how many it accepted.

    python benchmarks/spec_step_profile.py --method suffix --depth 24 [--conversations 6]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from k2serve.bench import spec_decode as bench
from k2serve.chat.prompt import PromptEncoder
from k2serve.engine import llm_engine, spec_decode
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm_engine import LLMEngine

ROOT = Path(__file__).resolve().parent.parent
SECONDS: dict[str, float] = {}
CALLS: Counter[str] = Counter()


def timed(owner: Any, name: str, key: str) -> None:
    """Wrap owner.name so that its CPU time adds to SECONDS[key] (and CALLS[key])."""
    inner: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            SECONDS[key] = SECONDS.get(key, 0.0) + time.thread_time() - t0
            CALLS[key] += 1

    setattr(owner, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "k2serve/model/demo"))
    ap.add_argument("--method", default="suffix", choices=["none", "ngram", "suffix"])
    ap.add_argument("--depth", type=int, default=24, help="suffix_decoding_max_tree_depth")
    ap.add_argument("--num-speculative-tokens", type=int, default=5)
    ap.add_argument("--conversations", type=int, default=6)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--compile", default="none", choices=["none", "decode"], help="the engine's --compile")
    ap.add_argument("--no-draft-budget", action="store_true", help="verify every proposed draft")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    k = args.num_speculative_tokens
    spec: dict[str, Any] | None = {
        "none": None,
        "ngram": {
            "method": "ngram",
            "num_speculative_tokens": k,
            "prompt_lookup_max": 4,
            "prompt_lookup_min": 1,
        },
        "suffix": {
            "method": "suffix",
            "num_speculative_tokens": k,
            "suffix_decoding_max_tree_depth": args.depth,
        },
    }[args.method]
    cfg = EngineConfig(
        num_kv_blocks=1024,
        block_size=16,
        enable_prefix_caching=True,
        speculative_config=spec,  # type: ignore[arg-type]
        compile=args.compile,
    )
    engine = LLMEngine.from_pretrained(Path(args.model), torch.float32, cfg)
    if args.no_draft_budget:
        engine.draft_budget = None
    for owner, name, key in (
        (spec_decode.Proposer, "propose", "propose"),
        (spec_decode.SuffixCache, "_sync", "propose: suffix trees catch up"),
        (spec_decode, "speculate", "propose: speculate"),
        (llm_engine.LLMEngine, "_verify", "verify drafts (accept, stops, KV roll-back)"),
        (llm_engine.LLMEngine, "_postprocess", "sample plain rows"),
        (llm_engine.LLMEngine, "step", "step (all)"),
    ):
        timed(owner, name, key)
    run = engine.runner.run
    forward: dict[str, list[float]] = {}

    def timed_run(rows: Any, *rest: Any, **kw: Any) -> Any:
        t0 = time.thread_time()
        out = run(rows, *rest, **kw)
        n = sum(len(r.token_ids) for r in rows)
        kind = "prefill" if n > k + 1 else f"decode 1+{n - 1}"
        forward.setdefault(kind, []).append(time.thread_time() - t0)
        return out

    engine.runner.run = timed_run  # type: ignore[method-assign]
    verifications: Counter[tuple[int, int]] = Counter()
    verify = llm_engine.LLMEngine._verify  # noqa: SLF001 (a profiling hook)

    def counted(self: LLMEngine, chunk: Any, logits: torch.Tensor) -> Any:
        before = self.spec_stats.num_accepted_tokens
        out = verify(self, chunk, logits)
        verifications[(len(chunk.drafts), self.spec_stats.num_accepted_tokens - before)] += 1
        return out

    llm_engine.LLMEngine._verify = counted  # type: ignore[method-assign]  # noqa: SLF001
    gc_start = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_start[0] = time.thread_time()
        else:
            SECONDS["garbage collector"] = (
                SECONDS.get("garbage collector", 0.0) + time.thread_time() - gc_start[0]
            )

    gc.callbacks.append(on_gc)
    runner = bench.Runner(engine, args.output_len)
    for prompt in ([1, 2, 3, 1, 2, 3], [5, 6, 7, 8] * 6, [9] * 12):  # warm-up (--compile: the buckets)
        runner.run([prompt])
    SECONDS.clear()
    CALLS.clear()
    forward.clear()
    verifications.clear()
    ns = argparse.Namespace(seed=0, conversations=args.conversations, turns=args.turns, batch=1)
    assert engine.tokenizer is not None
    bench.run_round(runner, "agent", ns, PromptEncoder(engine.tokenizer), 0)
    report = {
        "method": args.method,
        "depth": args.depth if args.method == "suffix" else None,
        "decode_tokens": runner.decode_tokens,
        "decode_tok_per_cpu_s": round(runner.tok_cpu_s, 1),
        "seconds": {key: round(v, 4) for key, v in SECONDS.items()},
        "calls": dict(CALLS),
        "forward_ms": {
            kind: {"steps": len(v), "mean": round(sum(v) / len(v) * 1e3, 2)}
            for kind, v in sorted(forward.items())
        },
        "verifications (drafts, accepted)": {f"{d},{a}": n for (d, a), n in sorted(verifications.items())},
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
