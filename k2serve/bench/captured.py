"""`k2serve bench captured`: decode tok/s of the eager step against the captured step (--compile decode).

Run: `k2serve bench captured [--preset tiny|small] [--dtype float32] [--batch-sizes 1,8,32]
[--context 64] [--steps 8] [--rounds 5] [--threads N] [--profile] [--modes eager,captured]`. One model (the preset's
checkpoint, written once under ~/.cache/k2serve), two engines over it with their own KV pools: eager
and captured. Each batch size: B greedy requests of --context prompt tokens in both, prefilled; the
captured engine's first decode step compiles (CPU: Inductor) or captures (CUDA) its bucket, timed and
reported; then --rounds rounds alternate --steps decode steps of each engine (paired, same process),
reported as decode tok/s medians with min-max spread (and GB/s: `step_weight_bytes` per step over
the median step time; the streaming read of the host is measured at the start and the end), and the greedy tokens of both are compared. --modes picks the engines (MODES below; e.g.
`captured-base,captured` is the A/B of the compiled step's small-batch kernels), alternated in
every round, in reversed order every other round.
--profile: torch.profiler over one decode step of each at the first batch size: the number of aten
ops dispatched and the top ops by self CPU time (where the step's time goes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from k2serve.bench.cpu_gemv import roofline
from k2serve.engine.captured import CapturedDecode
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.sampling_params import SamplingParams


def make_engine(model: Any, batch: int, context: int, tokens: int, compile: str) -> LLMEngine:
    """An engine of `batch` rows of up to context + tokens positions each over `model`."""
    bs = 16
    blocks = batch * (-(-(context + tokens + 2) // bs)) + 1
    cfg = EngineConfig(
        num_kv_blocks=blocks,
        block_size=bs,
        max_num_seqs=batch,
        max_num_batched_tokens=max(2048, context + 1),
        max_model_len=context + tokens + 2,
        enable_prefix_caching=False,
        compile=compile,
    )
    return LLMEngine(model, cfg, eos_token_ids=[])


def start(engine: LLMEngine, prompts: list[list[int]], tokens: int) -> None:
    """Add the prompts and step until every one has its first token (prefilled)."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    started: set[str] = set()
    while len(started) < len(prompts):
        started |= {o.request_id for o in engine.step() if o.new_token_ids}


def timed_steps(engine: LLMEngine, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return time.perf_counter() - t0


def op_profile(engine: LLMEngine, top: int = 6) -> dict[str, Any]:
    """torch.profiler over one decode step: aten ops dispatched, and the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
    events = prof.key_averages()
    aten = sum(e.count for e in events if e.key.startswith("aten::"))
    total_us = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "aten_ops": aten,
        "self_cpu_ms": total_us / 1e3,
        "top": [(e.key, e.count, round(e.self_cpu_time_total / 1e3, 2)) for e in ranked],
    }


def step_weight_bytes(model: Any, batch: int) -> float:
    """Bytes of weights one decode step of `batch` rows reads: every parameter and buffer but the
    embedding table (B rows of it) and the routed experts, of which the expected number of distinct
    experts B rows pick (E * (1 - (1 - k/E)^B), uniform routing: these random-weight presets route
    near uniformly) are read once each. An estimate for GB/s against the bandwidth, not a measurement."""
    from k2serve.model.moe import RoutedExperts

    cfg = model.config
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    distinct = e * (1 - (1 - k / e) ** batch)
    expert_ids = {id(t) for m in model.modules() if isinstance(m, RoutedExperts) for t in m.parameters()}
    total = 0.0
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        nbytes = t.numel() * t.element_size()
        if t is model.embed_tokens.weight and not cfg.tie_word_embeddings:
            nbytes = batch * t.shape[1] * t.element_size()
        elif id(t) in expert_ids:
            nbytes *= distinct / e
        total += nbytes
    return total


MODES = ("eager", "captured", "captured-base")
"""eager: --compile none; captured: --compile decode as served (its small-batch kernels on unless
K2SERVE_DECODE_GEMV=0); captured-base: --compile decode without them (model/compiled_gemv.py off)."""


def make_mode_engine(model: Any, batch: int, args: argparse.Namespace, tokens: int, mode: str) -> LLMEngine:
    """The engine of one mode (see MODES)."""
    engine = make_engine(model, batch, args.context, tokens, "none" if mode == "eager" else "decode")
    if mode == "eager":
        return engine
    captured = engine.runner.captured
    if captured is None:
        raise SystemExit("the captured step does not apply to this model (see the warning above)")
    if mode == "captured-base":
        engine.runner.captured = CapturedDecode(
            model, engine.pool, captured.pad_slot, batch, captured.max_blocks, gemv=False
        )
    return engine


def run_batch(model: Any, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    tokens = args.steps * args.rounds + 4 + (2 if args.profile else 0)
    g = torch.Generator().manual_seed(batch)
    vocab = model.config.vocab_size - 256
    prompts = torch.randint(0, vocab, (batch, args.context), generator=g).tolist()
    engines = {m: make_mode_engine(model, batch, args, tokens, m) for m in args.modes}
    for engine in engines.values():
        start(engine, prompts, tokens)
    out: dict[str, Any] = {"batch": batch, "compile_s": {}, "first_step_s": {}}
    for name, engine in engines.items():  # compiles / captures this batch's bucket
        t0 = time.perf_counter()
        engine.step()
        out["first_step_s"][name] = round(time.perf_counter() - t0, 1)
        if engine.runner.captured is not None:
            buckets = engine.runner.captured.buckets.values()
            out["compile_s"][name] = round(sum(b.seconds for b in buckets), 1)
    rates: dict[str, list[float]] = {m: [] for m in engines}
    for r in range(args.rounds):
        order = list(engines.items()) if r % 2 == 0 else list(engines.items())[::-1]
        for name, engine in order:
            rates[name].append(batch * args.steps / timed_steps(engine, args.steps))
    step_bytes = step_weight_bytes(model, batch)
    out["step_weight_mb"] = round(step_bytes / 1e6, 1)
    for name, xs in rates.items():
        med = statistics.median(xs)
        out[name] = {"median": med, "min": min(xs), "max": max(xs), "gbps": step_bytes * med / batch / 1e9}
    first = args.modes[0]
    out["ratio"] = {m: out[m]["median"] / out[first]["median"] for m in args.modes[1:]}
    if args.profile:
        out["profile"] = {m: op_profile(e) for m, e in engines.items()}
    want = {k: s.output_token_ids for k, s in engines[first].seqs.items()}
    out["identical_tokens"] = {}
    for m in args.modes[1:]:
        got = {k: s.output_token_ids for k, s in engines[m].seqs.items()}
        out["identical_tokens"][m] = f"{sum(got[k] == want[k] for k in want)}/{len(want)}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench captured", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--context", type=int, default=64, help="prompt tokens per row")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per engine per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--profile", action="store_true", help="op counts of one step of each")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "k2serve-bench"))
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument(
        "--modes",
        default="eager,captured",
        help=f"engines to alternate, comma-separated, the first is the reference ({', '.join(MODES)})",
    )
    args = ap.parse_args(argv)
    args.modes = args.modes.split(",")
    if len(args.modes) < 2 or not set(args.modes) <= set(MODES) or len(set(args.modes)) != len(args.modes):
        ap.error(f"--modes: two or more distinct of {', '.join(MODES)}, got {','.join(args.modes)!r}")
    from k2serve.model.checkpoint import preset_checkpoint
    from k2serve.model.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    root = Path(args.workdir)
    model = load_model(preset_checkpoint(root, args.preset, 0, dtype), dtype).eval()
    print(f"{args.preset} {args.dtype}, threads={torch.get_num_threads()}, context {args.context}, "
          f"{args.rounds} rounds x {args.steps} steps per engine, alternating", flush=True)  # fmt: skip
    results: list[dict[str, Any]] = [{"roofline_start": roofline(256, 5), "load": os.getloadavg()}]
    print(f"streaming read {results[0]['roofline_start']['read_gbps']:.1f} GB/s, load {os.getloadavg()}")
    for b in (int(x) for x in args.batch_sizes.split(",")):
        r = run_batch(model, b, args)
        results.append(r)
        parts = [
            f"{m} {r[m]['median']:8.1f} tok/s [{r[m]['min']:.1f}-{r[m]['max']:.1f}] {r[m]['gbps']:.1f} GB/s"
            for m in args.modes
        ]
        ratios = ", ".join(f"{m}/{args.modes[0]} {x:.2f}x" for m, x in r["ratio"].items())
        print(f"batch {b:3d}: {'  '.join(parts)}  ({ratios})  compile s {r['compile_s']}  identical greedy "
              f"tokens to {args.modes[0]} {r['identical_tokens']}", flush=True)  # fmt: skip
        for name, p in r.get("profile", {}).items():
            print(f"  {name}: {p['aten_ops']} aten ops, {p['self_cpu_ms']:.1f} ms self CPU; top: {p['top']}")
    results.append({"roofline_end": roofline(256, 5), "load": os.getloadavg()})
    print(
        f"streaming read at the end {results[-1]['roofline_end']['read_gbps']:.1f} GB/s, load {os.getloadavg()}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
