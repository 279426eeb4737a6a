"""The native CPU kernels (k2serve/model/cpu_kernels.py) against what they replace, with the weights
out of the last-level cache: each timed call cycles through ~400 MB of distinct weights, as a decode
step reads each weight once. Paired alternating rounds, medians with min-max.

    python benchmarks/native_gemv_probe.py [--threads 2] [--rounds 7]

- linear: `cpu_kernels.linear_bf16` against oneDNN on the prepacked weight (`PrepackedLinear`'s
  kernel), `small`'s layer shapes, 1, 2 and 4 rows;
- routed experts, bf16: `cpu_kernels.moe_bf16` against `compiled_gemv.gathered_experts_torch` compiled
  by Inductor (the captured step's path before), `small`'s MoE layer, 1 and 4 tokens;
- routed experts, INT4 (torch's CPU tiles): `cpu_kernels.moe_int4` against torch's fused INT4 kernel
  called per routed expert (the eager step's path), 1 token.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from k2serve.bench.int4_experts import time_paired
from k2serve.model import compiled_gemv, cpu_kernels
from k2serve.model.quant import quantize_int4

E, D, I, K, GROUP = 64, 1024, 256, 8, 32  # `small`'s MoE layer
BYTES = 400e6


def paired(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """`time_paired` over named calls."""
    return dict(zip(fns, time_paired(list(fns.values()), rounds), strict=True))


def report(label: str, nbytes: float, times: dict[str, list[float]]) -> None:
    cells = []
    for k, ts in times.items():
        med = statistics.median(ts)
        cells.append(
            f"{k} {nbytes / med / 1e9:.1f} GB/s ({nbytes / max(ts) / 1e9:.1f}-{nbytes / min(ts) / 1e9:.1f})"
        )
    print(f"{label}: " + "; ".join(cells), flush=True)


def linears(rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    for n, d in ((32256, 1024), (5632, 1024), (1024, 2816), (384, 1024), (1024, 512)):
        copies = max(1, int(BYTES // (n * d * 2)))
        ws = [(torch.randn(n, d, generator=g) * 0.03).bfloat16() for _ in range(copies)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws]  # noqa: SLF001
        for rows in (1, 2, 4):
            x = torch.randn(rows, d, generator=g).bfloat16()
            fns = {
                "oneDNN packed": lambda x=x, packed=packed: [
                    torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [None], "")  # noqa: SLF001
                    for p in packed
                ],
                "native": lambda x=x, ws=ws: [cpu_kernels.linear_bf16(x, w) for w in ws],
            }
            report(f"linear {n}x{d} rows={rows}", copies * n * d * 2, paired(fns, rounds))


def routed_bf16(rounds: int) -> None:
    g = torch.Generator().manual_seed(1)
    layers = int(BYTES // (E * 3 * D * I * 2 / 8 * K / 8))  # ~enough layers that the routed ones pass 400 MB
    layers = max(8, min(layers, 28))
    w13 = [(torch.randn(E, 2 * I, D, generator=g) * 0.03).bfloat16() for _ in range(layers)]
    w2 = [(torch.randn(E, D, I, generator=g) * 0.03).bfloat16() for _ in range(layers)]
    compiled = torch.compile(compiled_gemv.gathered_experts_torch, dynamic=False)
    for t in (1, 4):
        x, weights = torch.randn(t, D, generator=g).bfloat16(), torch.rand(t, K, generator=g)
        ids = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]) for _ in range(layers)]
        compiled(x, weights, ids[0], w13[0], w2[0])
        nbytes = sum(len(set(i.flatten().tolist())) for i in ids) * 3 * D * I * 2
        fns = {
            "Inductor gathered": lambda x=x, w=weights, ids=ids: [
                compiled(x, w, ids[j], w13[j], w2[j]) for j in range(layers)
            ],
            "native": lambda x=x, w=weights, ids=ids: [
                cpu_kernels.moe_bf16(x, w, ids[j], w13[j], w2[j]) for j in range(layers)
            ],
        }
        report(f"routed experts bf16 tokens={t} ({layers} layers)", nbytes, paired(fns, rounds))


def routed_int4(rounds: int) -> None:
    g = torch.Generator().manual_seed(2)
    layers = 14

    def one(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q, scale = quantize_int4(torch.randn(n, k, generator=g) * k**-0.5, GROUP)
        tiles = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 2)
        sz = torch.zeros(k // GROUP, n, 2, dtype=torch.bfloat16)
        sz[..., 0] = scale.t()
        return tiles, sz

    ws = []
    for _ in range(layers):
        a, b = [one(2 * I, D) for _ in range(E)], [one(D, I) for _ in range(E)]
        ws.append(tuple(torch.stack([w[i] for w in m]) for m in (a, b) for i in (0, 1)))
    x, weights = torch.randn(1, D, generator=g).bfloat16(), torch.rand(1, K, generator=g)
    ids = [torch.randperm(E, generator=g)[:K].view(1, K) for _ in range(layers)]

    def fused(j: int) -> torch.Tensor:
        w13, s13, w2, s2 = ws[j]
        out = torch.zeros(1, D, dtype=torch.bfloat16)
        for slot in range(K):
            e = int(ids[j][0, slot])
            h = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w13[e], GROUP, s13[e])
            gate, up = h.split(I, -1)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(F.silu(gate) * up, w2[e], GROUP, s2[e])
            out += y * weights[0, slot].bfloat16()
        return out

    fns = {
        "torch fused per expert": lambda: [fused(j) for j in range(layers)],
        "native": lambda: [cpu_kernels.moe_int4(x, weights, ids[j], *ws[j], GROUP) for j in range(layers)],
    }
    nbytes = layers * K * 3 * D * I * (0.5 + 4 / GROUP)
    report(f"routed experts INT4 tokens=1 ({layers} layers)", nbytes, paired(fns, rounds))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if not cpu_kernels.available():
        print(f"native kernels unavailable: {cpu_kernels.unavailable_reason()}")
        return 1
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} rounds={args.rounds}; load average {os.getloadavg()}")
    with torch.inference_mode():
        linears(args.rounds)
        routed_bf16(args.rounds)
        routed_int4(args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
