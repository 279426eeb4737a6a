"""One MoE layer's routed experts on CPU, per batch size: k2serve's native kernels against the torch paths
they replace (where the grouped expert kernels' row limits in model/compiled_gemv.py come from).

bf16 experts: `cpu_kernels.moe_bf16` (per (token, expert) row), `moe_bf16_grouped` (each routed expert
read once for all its rows), `moe_bf16_amx` (the same on AMX tiles, where the CPU has them) and torch's
grouped GEMM (`aten._grouped_mm` over the rows sorted by expert,
as the captured step ran them before). INT4 experts in torch's CPU tiles: `moe_int4`, `moe_int4_grouped`
and the eager `RoutedExperts.forward` without the native kernels (torch's fused INT4 kernel per
expert, or a dequantised expert from its row threshold). Random weights of the preset's expert shape,
random distinct experts per token; each timed call is run twice, medians of `--rounds` alternating
rounds, milliseconds. Past 128 tokens (prefill chunks) the per-row kernels are left out.

    python benchmarks/moe_kernels_probe.py --presets small,moe200m --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from k2serve.config import ModelConfig
from k2serve.model import cpu_kernels
from k2serve.model.moe import RoutedExperts
from k2serve.model.presets import PRESETS
from k2serve.model.quant import quantize_int4

GROUPED_MM = torch.ops.aten._grouped_mm  # noqa: SLF001 (public in aten)


def timed(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms of two calls of each function, over `rounds` alternating rounds (after one warm call)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            fn()
            times[name].append((time.perf_counter() - t) / 2 * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def int4_tiles(e: int, n: int, k: int, group: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """e experts' [n, k] weights quantised as k2serve's INT4 checkpoints are, in torch's CPU tiles."""
    tiles, szs = [], []
    for _ in range(e):
        q, scale = quantize_int4(torch.randn(n, k, generator=g) * k**-0.5, group)
        tiles.append(
            torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 2)
        )
        sz = torch.zeros(k // group, n, 2, dtype=torch.bfloat16)
        sz[..., 0] = scale.t()
        szs.append(sz)
    return torch.stack(tiles), torch.stack(szs)


def measure(
    t: int,
    k: int,
    experts: RoutedExperts,
    w13: torch.Tensor,
    w2: torch.Tensor,
    rounds: int,
    g: torch.Generator,
) -> str:
    """One line of figures for `t` tokens over one layer's experts (dense w13 / w2; INT4 in `experts`)."""
    e, inter = w13.shape[0], w2.shape[-1]
    x = torch.randn(t, w13.shape[-1], generator=g).bfloat16()
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g)
    int4 = (experts.w13_i4, experts.w13_sz, experts.w2_i4, experts.w2_sz)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    tokens = order // k

    def torch_grouped() -> torch.Tensor:
        counts = torch.bincount(flat, minlength=e).to(torch.int32).cumsum(0, dtype=torch.int32)
        gate, up = GROUPED_MM(x[tokens], w13.transpose(1, 2), offs=counts).split(inter, dim=-1)
        y = GROUPED_MM(F.silu(gate) * up, w2.transpose(1, 2), offs=counts)
        y = y * weights.flatten()[order].unsqueeze(1).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, y)

    def torch_int4() -> torch.Tensor:  # the eager path before the native kernels: per expert
        y = experts.run_loop(x[tokens], torch.bincount(flat, minlength=e).tolist())
        y = y * weights.flatten()[order].unsqueeze(1).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, y)

    bf16_fns: dict[str, Callable[[], object]] = {
        "moe_bf16": lambda: cpu_kernels.moe_bf16(x, weights, ids, w13, w2),
        "moe_bf16_grouped": lambda: cpu_kernels.moe_bf16_grouped(x, weights, ids, w13, w2),
        "torch grouped GEMM": torch_grouped,
    }
    if cpu_kernels.amx_available():
        bf16_fns["moe_bf16_amx"] = lambda: cpu_kernels.moe_bf16_amx(x, weights, ids, w13, w2)
    q4_fns: dict[str, Callable[[], object]] = {
        "moe_int4": lambda: cpu_kernels.moe_int4(x, weights, ids, *int4, 32),
        "moe_int4_grouped": lambda: cpu_kernels.moe_int4_grouped(x, weights, ids, *int4, 32),
        "torch INT4 per expert": torch_int4,
    }
    if t > 128:
        del bf16_fns["moe_bf16"], q4_fns["moe_int4"]
    with torch.inference_mode():
        bf16, q4 = timed(bf16_fns, rounds), timed(q4_fns, rounds)
    cells = " ".join(f"{n} {v:.2f}" for n, v in (bf16 | q4).items())
    amx = (
        f", grouped bf16 / AMX {bf16['moe_bf16_grouped'] / bf16['moe_bf16_amx']:.2f}, grouped GEMM / AMX "
        f"{bf16['torch grouped GEMM'] / bf16['moe_bf16_amx']:.2f}"
        if "moe_bf16_amx" in bf16
        else ""
    )
    return (
        f"tokens {t} rows {t * k} ({t * k / e:.1f} an expert): {cells}; grouped GEMM / grouped bf16 "
        f"{bf16['torch grouped GEMM'] / bf16['moe_bf16_grouped']:.2f}{amx}, torch INT4 / grouped INT4 "
        f"{q4['torch INT4 per expert'] / q4['moe_int4_grouped']:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="small,moe200m")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    if not cpu_kernels.available():
        print(f"native CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
        return 1
    torch.set_num_threads(args.threads)
    for preset in args.presets.split(","):
        config = ModelConfig.from_dict(dict(PRESETS[preset]))
        e, d, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        g = torch.Generator().manual_seed(0)
        w13 = (torch.randn(e, 2 * inter, d, generator=g) * d**-0.5).bfloat16()
        w2 = (torch.randn(e, d, inter, generator=g) * inter**-0.5).bfloat16()
        experts = RoutedExperts(config, int4_group_size=32, dtype=torch.bfloat16, int4_layout="cpu")
        w13_i4, w13_sz = int4_tiles(e, 2 * inter, d, 32, g)
        w2_i4, w2_sz = int4_tiles(e, d, inter, 32, g)
        for name, value in (("w13_i4", w13_i4), ("w13_sz", w13_sz), ("w2_i4", w2_i4), ("w2_sz", w2_sz)):
            getattr(experts, name).copy_(value)
        for t in (int(s) for s in args.tokens.split(",")):
            print(
                f"{preset} {measure(t, config.num_experts_per_tok, experts, w13, w2, args.rounds, g)}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
