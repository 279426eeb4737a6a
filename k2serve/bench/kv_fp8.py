"""`python -m k2serve.bench.kv_fp8`: the fp8 latent cache against the bf16 cache on the same weights.

One prompt (random token ids, seed 0) through the model runner twice, once over a bf16 pool and once
over an fp8 pool (kvcache/fp8.py), then `--new-tokens` greedy decode steps:
- teacher-forced: both pools decode the bf16 run's greedy tokens, so every step compares logits of
  the same context: max |logit error|, its ratio to the logits' std, and top-1 agreement;
- free-running: each pool decodes its own greedy tokens; agreement is the share of equal positions
  and the length of the common prefix.
- calibration: the first token's logits after the prompt over an fp32 pool, against those over a
  bf16 pool and over an fp8 pool (how much the model amplifies any cache rounding).
Also the decode time per token of each (the fp8 one pays the per-tile dequantization on CPU).

`--speed`: the decode speed of the two caches, measured as a comparison: one process, one model (the
long-context bench's: the `long` preset cut to LONG_BENCH_DIMS; `--k2-latent` gives it K2's 512 + 64
latent row), and per context length a bf16 pool and an fp8 pool holding the same random latent (as after
a prefill of that length). Each round times one decode step (one token at the full context) over each
pool, the order alternating round by round (bf16 first, then fp8 first), so that the machine's load
hits both alike; reported: the median ms per step of each with its min-max, and the median of the
per-round fp8 / bf16 ratios with their interquartile range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from k2serve.engine.model_runner import ModelRunner, RowSpec
from k2serve.kvcache.fp8 import Fp8Layout
from k2serve.kvcache.pool import KVCachePool
from k2serve.model.model import K2Model


def _pool(
    model: K2Model, tokens: int, block_size: int, fp8: bool, dtype: torch.dtype = torch.bfloat16
) -> tuple[KVCachePool, list[int]]:
    mc = model.config
    blocks = -(-tokens // block_size)
    layout = Fp8Layout(mc.kv_lora_rank, mc.qk_rope_head_dim) if fp8 else None
    dtype = model.dtype if fp8 else dtype
    pool = KVCachePool(mc.num_hidden_layers, blocks + 1, block_size, mc.kv_cache_dim, dtype, "cpu", layout)
    return pool, list(range(blocks))


@torch.inference_mode()
def decode(
    model: K2Model, prompt: list[int], new_tokens: int, fp8: bool, forced: list[int] | None = None
) -> tuple[list[int], list[torch.Tensor], float]:
    """Greedy tokens, the logits of each step (fp32 [V]) and seconds per decode step; with `forced`
    the step after token i is fed forced[i] instead of its own choice."""
    block_size = 16
    pool, table = _pool(model, len(prompt) + new_tokens, block_size, fp8)
    runner = ModelRunner(model, pool, pad_slot=(pool.num_blocks - 1) * block_size)
    logits = runner.run([RowSpec(prompt, 0, table, True)])[0]
    tokens, all_logits = [int(logits.argmax())], [logits]
    t0 = time.perf_counter()
    for i in range(new_tokens - 1):
        fed = forced[i] if forced is not None else tokens[-1]
        logits = runner.run([RowSpec([fed], len(prompt) + i, table, True)])[0]
        tokens.append(int(logits.argmax()))
        all_logits.append(logits)
    per_step = (time.perf_counter() - t0) / max(new_tokens - 1, 1)
    return tokens, all_logits, per_step


@torch.inference_mode()
def calibrate(model: K2Model, prompt: list[int]) -> dict[str, float]:
    """Mean |error| of the first token's logits over a bf16 and an fp8 pool against an fp32 pool."""
    logits = {}
    for name, fp8, dtype in (
        ("fp32", False, torch.float32),
        ("bf16", False, torch.bfloat16),
        ("fp8", True, None),
    ):
        pool, table = _pool(model, len(prompt), 16, fp8, dtype or torch.float32)
        runner = ModelRunner(model, pool, pad_slot=(pool.num_blocks - 1) * 16)
        logits[name] = runner.run([RowSpec(prompt, 0, table, True)])[0]
    return {
        f"prefill_mean_abs_logit_error_{k}_vs_fp32": float((logits[k] - logits["fp32"]).abs().mean())
        for k in ("bf16", "fp8")
    }


def compare(model: K2Model, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    """The figures of the module docstring for one prompt."""
    ref, ref_logits, t_bf16 = decode(model, prompt, new_tokens, fp8=False)
    forced, forced_logits, _ = decode(model, prompt, new_tokens, fp8=True, forced=ref)
    free, _, t_fp8 = decode(model, prompt, new_tokens, fp8=True)
    a, b = torch.stack(ref_logits), torch.stack(forced_logits)  # [N, V]
    err = (a - b).abs()
    common = next((i for i, (x, y) in enumerate(zip(ref, free, strict=True)) if x != y), new_tokens)
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "max_abs_logit_error": float(err.max()),
        "mean_abs_logit_error": float(err.mean()),
        "max_error_over_logit_std": float((err.amax(-1) / a.std(-1)).max()),
        "teacher_forced_top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "free_running_agreement": sum(x == y for x, y in zip(ref, free, strict=True)) / new_tokens,
        "free_running_common_prefix": common,
        "decode_s_per_token_bf16": t_bf16,
        "decode_s_per_token_fp8": t_fp8,
        **calibrate(model, prompt),
    }


def _quartiles(values: list[float]) -> tuple[float, float]:
    """The first and third quartiles (inclusive method), the spread a median is reported with."""
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


@torch.inference_mode()
def speed(model: K2Model, context: int, rounds: int) -> dict[str, Any]:
    """Paired decode timing of a bf16 and an fp8 pool at `context` cached positions (module docstring)."""
    block_size = 16
    runners: dict[str, ModelRunner] = {}
    values = torch.randn(context, model.config.kv_cache_dim, generator=torch.Generator().manual_seed(0))
    for name in ("bf16", "fp8"):
        pool, table = _pool(model, context, block_size, fp8=name == "fp8")
        slots = pool.slot_mapping(table, 0, context)
        for layer in range(pool.num_layers):
            pool.write(layer, slots, values)  # the same latent in both (rounded to each format)
        runners[name] = ModelRunner(model, pool, pad_slot=(pool.num_blocks - 1) * block_size)
    row = RowSpec([7], context - 1, table, True)  # both pools' tables are range(blocks)

    def step(name: str) -> float:
        t0 = time.perf_counter()
        runners[name].run([row])
        return time.perf_counter() - t0

    warm = {name: runner.run([row])[0] for name, runner in runners.items()}  # warm-up
    times: dict[str, list[float]] = {"bf16": [], "fp8": []}
    for r in range(rounds):
        for name in ("bf16", "fp8") if r % 2 == 0 else ("fp8", "bf16"):
            times[name].append(step(name))
    ratios = [f / b for f, b in zip(times["fp8"], times["bf16"], strict=True)]
    out: dict[str, Any] = {"context": context, "rounds": rounds}
    for name, spent in times.items():
        out[f"{name}_ms"] = statistics.median(spent) * 1e3
        out[f"{name}_ms_min_max"] = [min(spent) * 1e3, max(spent) * 1e3]
    out["fp8_over_bf16"] = statistics.median(ratios)
    out["fp8_over_bf16_iqr"] = list(_quartiles(ratios))
    out["max_abs_logit_diff"] = float((warm["fp8"] - warm["bf16"]).abs().max())  # both read the same latent
    return out


def run_speed(contexts: list[int], rounds: int, k2_latent: bool) -> None:
    """`--speed`: print one markdown row (or JSON object) per context length."""
    from k2serve.bench.long_context import write_long_bench_checkpoint
    from k2serve.model.loader import load_model

    latent = {"kv_lora_rank": 512, "qk_rope_head_dim": 64} if k2_latent else {}
    with tempfile.TemporaryDirectory() as d:
        model = load_model(write_long_bench_checkpoint(Path(d), **latent), torch.float32)
    c = model.config
    print(
        f"model: long bench dims, latent {c.kv_lora_rank} + {c.qk_rope_head_dim}, fp32 weights, {rounds} rounds"
    )
    print("| context | bf16 ms/step (min-max) | fp8 ms/step (min-max) | fp8 / bf16 per round, median (IQR) |")
    print("|---:|---:|---:|---:|")
    for n in contexts:
        r = speed(model, n, rounds)
        (b0, b1), (f0, f1), (q1, q3) = r["bf16_ms_min_max"], r["fp8_ms_min_max"], r["fp8_over_bf16_iqr"]
        print(
            f"| {n:,} | {r['bf16_ms']:.2f} ({b0:.2f}-{b1:.2f}) | {r['fp8_ms']:.2f} ({f0:.2f}-{f1:.2f}) "
            f"| {r['fp8_over_bf16']:.2f} ({q1:.2f}-{q3:.2f}) |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    from k2serve.model.checkpoint import write_checkpoint
    from k2serve.model.loader import load_model

    ap = argparse.ArgumentParser(
        prog="python -m k2serve.bench.kv_fp8",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--speed", action="store_true", help="paired decode timing of bf16 and fp8 pools instead")
    ap.add_argument("--contexts", default="1024,8192,32768", help="--speed: comma-separated context lengths")
    ap.add_argument("--rounds", type=int, default=15, help="--speed: paired rounds per context")
    ap.add_argument("--k2-latent", action="store_true", help="--speed: K2's 512 + 64 latent row")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.speed:
        contexts = [int(x) for x in args.contexts.split(",")]
        if args.rounds < 2 or any(n < 1 for n in contexts):
            ap.error("--speed needs --rounds >= 2 and positive --contexts")
        run_speed(contexts, args.rounds, args.k2_latent)
        return 0
    with tempfile.TemporaryDirectory() as d:
        model = load_model(write_checkpoint(d, args.preset, seed=0, dtype=torch.float32), torch.float32)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(model.config.vocab_size, (args.prompt_len,), generator=gen).tolist()
    print(json.dumps({"preset": args.preset, **compare(model, prompt, args.new_tokens)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
