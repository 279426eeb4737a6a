"""Measure the dry-run's model parameters on this machine with the offline engine (the command line is
`python -m k2serve.planner.measure_cli (--preset tiny | --model DIR) [--dtype float32]`).

- prefill tokens/s: one prompt of `--prompt-len` random tokens, max_tokens=1 (after a warm-up);
- decode: the mean time per step of a batch of b sequences of `--decode-len` tokens each, for each
  b in `--batches`, fitted to itl(b) = base + per_seq x b by least squares;
- KV tokens per decode replica: `--kv-cache-mb` divided by the model's latent KV bytes per token.
Each figure is the best of `--repeats` runs. Prints the `k2serve planner --dry-run` flags that carry them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from k2serve.engine.config import EngineConfig
from k2serve.engine.llm import LLM
from k2serve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Measured:
    prefill_tokens_per_s: float
    decode_itl_base_s: float
    decode_itl_per_seq_s: float
    decode_kv_tokens: int
    itl_by_batch: dict[int, float]

    def flags(self) -> str:
        return (
            f"--prefill-tokens-per-s {self.prefill_tokens_per_s:.0f} "
            f"--decode-itl-base {self.decode_itl_base_s:.4f} "
            f"--decode-itl-per-seq {self.decode_itl_per_seq_s:.5f} --decode-kv-tokens {self.decode_kv_tokens}"
        )


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys on xs; the slope is clamped at >= 0 and one point gives
    slope 0."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var) if var else 0.0
    return my - slope * mx, slope


def measure(
    model_dir: Path,
    dtype: str = "float32",
    prompt_len: int = 2048,
    batches: Sequence[int] = (1, 8, 32),
    decode_len: int = 32,
    kv_cache_mb: int = 1024,
    repeats: int = 3,
) -> Measured:
    """Each figure is the best of `repeats` runs (other load on the machine only slows runs down)."""
    cfg = EngineConfig(
        kv_cache_bytes=max(kv_cache_mb, 64) << 20,
        max_num_seqs=max(batches),
        max_num_batched_tokens=max(2048, prompt_len),
        enable_prefix_caching=False,
    )
    llm = LLM(model_dir, dtype=dtype, engine_config=cfg)
    gen = torch.Generator().manual_seed(0)
    vocab = llm.engine.model.config.vocab_size

    def prompt(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    def greedy(max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)

    llm.generate([prompt(16)], greedy(4))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        llm.generate([prompt(prompt_len)], greedy(1))
        best = min(best, time.perf_counter() - t)
    prefill_tps = prompt_len / best
    itl: dict[int, float] = {}
    for b in batches:
        for _ in range(repeats):
            outs = llm.generate([prompt(16) for _ in range(b)], greedy(decode_len))
            m = outs[0].metrics  # all b run as one batch: every step serves all of them
            step = m.tpot
            itl[b] = min(itl.get(b, float("inf")), step)
    base, per_seq = fit_line(list(itl), list(itl.values()))
    bytes_per_token = llm.engine.kv_geometry.bytes_per_token
    return Measured(prefill_tps, max(base, 1e-4), per_seq, (kv_cache_mb << 20) // bytes_per_token, itl)
