"""HBM traffic of one MoE layer's routed experts: the fused Triton path against torch around the kernel.

Run: `k2serve bench moe-traffic [--batch-sizes 1,64] [--json]`. A computed table, not a measurement (this
repo's host has no GPU): nominal bytes, each op reading its inputs from and writing its outputs to HBM
(no reuse through L2 counted), at K2's dims (hidden 7168, moe_intermediate 2048, 384 routed experts,
top-8, W4A16 INT4 group 32 with bf16 scales, bf16 activations). Weights: the expected distinct experts
of B tokens x top-8 uniform picks, E (1 - (1 - k/E)^B), as `bench device`'s roofline counts them.

Unfused (`--moe-backend triton` before the fusion, and the torch path's data flow): gather x[tokens]
(read + write N = B*k rows of H), GEMM1 (read N x H, write N x 2I), silu(gate) (read + write N x I),
* up (read 2 N x I, write N x I), GEMM2 (read N x I, write N x H), * routing weight (read + write N x H),
zeros_like(x) (write B x H), index_add_ (read N x H, read + write N x H of the output rows), and a host
sync for the per-expert counts (`.tolist()`), so no CUDA graph can capture the layer.
Fused (`model/triton_moe.py`): gate_up reads A rows by sorted_id // k (N x H; only B x H distinct)
and writes silu(gate) * up (N x I); down reads N x I and writes [B, k, H] (N x H); the sum over k
reads N x H and writes B x H. The alignment's index tensors (a few N-sized int32/int64 arrays) and the
routing weights are left out of both (a few KB).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

K2_MOE = {"hidden": 7168, "inter": 2048, "experts": 384, "top_k": 8, "group": 32}


@dataclass(frozen=True)
class MoETraffic:
    batch: int
    experts_touched: float
    weight_bytes: float  # the touched experts' packed INT4 weights and scales (both paths read them)
    unfused_act_bytes: int  # activation bytes the unfused path moves
    fused_act_bytes: int
    unfused_kernels: int  # device ops of the routed part (GEMMs and elementwise), not the routing
    fused_kernels: int

    @property
    def saved_bytes(self) -> int:
        return self.unfused_act_bytes - self.fused_act_bytes

    @property
    def saved_fraction(self) -> float:
        """Saved bytes over all the unfused path's bytes (weights included)."""
        return self.saved_bytes / (self.weight_bytes + self.unfused_act_bytes)


def moe_traffic(
    batch: int, hidden: int, inter: int, experts: int, top_k: int, group: int, act_bytes: int = 2
) -> MoETraffic:
    """The table's row for `batch` tokens (see the module docstring for what each path moves)."""
    n, h, i, b = batch * top_k, hidden, inter, act_bytes
    per_weight = 0.5 + act_bytes / group  # 4 bits + a scale of the activations' dtype per group
    touched = experts * (1 - (1 - top_k / experts) ** batch)
    weights = touched * 3 * h * i * per_weight  # w13 [2I, H] + w2 [H, I]
    unfused = (
        2 * n * h  # gather
        + n * h + 2 * n * i  # GEMM1
        + 2 * n * i  # silu
        + 3 * n * i  # * up
        + n * i + n * h  # GEMM2
        + 2 * n * h  # * routing weight
        + batch * h  # zeros_like
        + 3 * n * h  # index_add_
    ) * b  # fmt: skip
    fused = (n * h + n * i + n * i + n * h + n * h + batch * h) * b
    return MoETraffic(batch, touched, weights, unfused, fused, 8, 3)


def table(batches: list[int]) -> str:
    """A markdown table of moe_traffic at K2's dims, one row per batch size."""
    rows = [
        "| batch | experts touched | weights MB | unfused act. MB | fused act. MB | saved MB | saved / all |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch in batches:
        r = moe_traffic(batch, **K2_MOE)
        rows.append(
            f"| {batch} | {r.experts_touched:.1f} | {r.weight_bytes / 1e6:,.1f} | "
            f"{r.unfused_act_bytes / 1e6:.3f} | {r.fused_act_bytes / 1e6:.3f} | "
            f"{r.saved_bytes / 1e6:.3f} | {100 * r.saved_fraction:.2f}% |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="k2serve bench moe-traffic", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.json:
        for batch in batches:
            print(json.dumps(asdict(moe_traffic(batch, **K2_MOE))))
    else:
        print(table(batches))
    return 0
