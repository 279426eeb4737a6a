"""One INT4 routed expert, fused kernel against dequantise-then-dense-GEMM, per row count.

Run: `k2serve bench int4-experts [--preset small] [--rows 1,2,4,...] [--repeats 400] [--dtype D]`.
Builds one expert of the preset's shape in torch's CPU int4 tiles (random weights, group 32) and
times `RoutedExperts.swiglu_int4_fused` (two `aten._weight_int4pack_mm_for_cpu` calls) against
`RoutedExperts.swiglu_dense` (dequantise both weights, then bucket-padded dense GEMMs: the path
`INT4_DENSE_MIN_ROWS` switches to) on the same rows in the compute dtype. The host is shared and
noisy, so each repeat times both paths back to back in alternating order, and the figures are
medians: of each path's times and of the per-repeat ratio dense / fused. The suggested threshold is
the smallest measured row count from which the dense path is faster at every larger one.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from k2serve.config import ModelConfig
from k2serve.model.moe import INT4_DENSE_MIN_ROWS, RoutedExperts
from k2serve.model.presets import PRESETS
from k2serve.model.quant import pack_int4, quantize_int4

GROUP = 32


def int4_expert(config: ModelConfig, dtype: torch.dtype, seed: int = 0) -> RoutedExperts:
    """A one-expert RoutedExperts of `config`'s shape in the "cpu" INT4 layout, random weights."""
    experts = RoutedExperts(config, [0], int4_group_size=GROUP, dtype=dtype, int4_layout="cpu")
    g = torch.Generator().manual_seed(seed)
    d, i = config.hidden_size, config.moe_intermediate_size
    parts = []
    for shape in ((2 * i, d), (d, i)):
        q, scale = quantize_int4(torch.randn(shape, generator=g) * 0.02, GROUP)
        parts += [pack_int4(q), scale.to(dtype)]
    experts.set_int4_expert(0, *parts)
    return experts


def time_paired(fns: Sequence[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Seconds per call of each fn, all timed in every repeat, order reversed every other repeat."""
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for r in range(repeats):
        for k in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def measure(experts: RoutedExperts, rows: Sequence[int], repeats: int, warmup: int = 20) -> list[dict]:
    """Per row count: median µs of the fused and dense paths and the median per-repeat ratio."""
    results = []
    with torch.inference_mode():
        for n in rows:
            x = torch.randn(n, experts.hidden, dtype=experts.compute_dtype)
            fused = functools.partial(experts.swiglu_int4_fused, 0, x)
            dense = functools.partial(experts.swiglu_dense, 0, x)
            time_paired((fused, dense), warmup)
            t_fused, t_dense = time_paired((fused, dense), repeats)
            results.append(
                {
                    "rows": n,
                    "fused_us": statistics.median(t_fused) * 1e6,
                    "dense_us": statistics.median(t_dense) * 1e6,
                    "dense_over_fused": statistics.median(
                        d / f for d, f in zip(t_dense, t_fused, strict=True)
                    ),
                }
            )
    return results


def suggested_threshold(results: Sequence[dict]) -> int | None:
    """The smallest row count from which dense / fused < 1 at it and every larger count, or None."""
    best = None
    for r in sorted(results, key=lambda r: r["rows"], reverse=True):
        if r["dense_over_fused"] >= 1:
            break
        best = r["rows"]
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench int4-experts", description=__doc__)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--rows", default="1,2,4,8,12,16,24,32,48,64,72,80,96,128")
    ap.add_argument("--repeats", type=int, default=400)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    config = ModelConfig.from_dict(PRESETS[args.preset])
    dtype = getattr(torch, args.dtype)
    experts = int4_expert(config, dtype)
    rows = [int(r) for r in args.rows.split(",")]
    print(
        f"{args.preset} expert: D={config.hidden_size} I={config.moe_intermediate_size} group={GROUP} "
        f"{args.dtype}, threads={torch.get_num_threads()}, {args.repeats} paired repeats per row count"
    )
    results = measure(experts, rows, args.repeats)
    print(f"{'rows':>5} {'fused us':>9} {'dense us':>9} {'dense/fused':>12}")
    for r in results:
        print(f"{r['rows']:5d} {r['fused_us']:9.1f} {r['dense_us']:9.1f} {r['dense_over_fused']:12.2f}")
    threshold = suggested_threshold(results)
    in_use = INT4_DENSE_MIN_ROWS.get(dtype, 1)
    print(f"dense from {threshold} rows on (INT4_DENSE_MIN_ROWS for {args.dtype} in use: {in_use})")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"results": results, "suggested_threshold": threshold}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
