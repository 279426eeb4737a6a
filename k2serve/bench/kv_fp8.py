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
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
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


def main(argv: list[str] | None = None) -> int:
    from k2serve.model.checkpoint import write_checkpoint
    from k2serve.model.loader import load_model

    ap = argparse.ArgumentParser(prog="python -m k2serve.bench.kv_fp8", description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        model = load_model(write_checkpoint(d, args.preset, seed=0, dtype=torch.float32), torch.float32)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(model.config.vocab_size, (args.prompt_len,), generator=gen).tolist()
    print(json.dumps({"preset": args.preset, **compare(model, prompt, args.new_tokens)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
