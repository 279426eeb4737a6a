"""Mixture of experts: `noaux_tc` routing, grouped routed experts (bf16/fp32 or packed INT4), shared experts.

The routed experts of a layer can be a subset (what an expert-parallel rank owns): `expert_ids` lists
the global ids held, in local order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from k2serve.config import ModelConfig
from k2serve.model import compiled_gemv, cpu_kernels
from k2serve.model.layers import DenseMLP
from k2serve.model.quant import (
    Int4CpuTiles,
    dequantize_int4,
    dequantize_int4pack_cpu,
    int4pack_cpu_tiles,
    pack_int4_cpu_into,
)
from k2serve.model.shapes import bucket
from k2serve.model.triton_moe import ExpertWeight, fused_moe, sorted_expert_ids

# INT4 experts in torch's CPU tiles, per compute dtype: an expert with at least this many rows in a call
# is dequantised (that expert only, for that call) and run through dense GEMMs; fewer rows go through
# torch's fused INT4 kernel. Measured with `k2serve bench int4-experts` on `small`'s experts (D=1024,
# I=256, group 32; 2 threads on this repo's 2-core host; paired, interleaved, medians of 400 repeats):
#   bf16: dense / fused time 9.5-9.9 at 1 row, 3.1 at 16, 1.7 at 32, 0.98-0.99 at 64, 0.94 at 72,
#     0.70 at 96, 0.57-0.58 at 128 (two runs): the fused kernel costs ~9 us more per row, the dense
#     path a fixed ~0.5 ms (dequantising both weights ~0.32 ms), then little per row;
#   fp32, fp16: the fused kernel has no fast path (fp32 0.65 ms at 1 row and ~0.59 ms more per row,
#     fp16 ~1 ms per row): dense / fused is 0.68 (fp32) and 0.73 (fp16) at 1 row already.
# Other dtypes go dense. K2SERVE_INT4_DENSE_MIN_ROWS, read at import, sets all three thresholds to
# one value (a huge one keeps the fused kernel for every call, the behaviour before this table).
_MEASURED_INT4_DENSE_MIN_ROWS = {torch.bfloat16: 64, torch.float16: 1, torch.float32: 1}
INT4_DENSE_MIN_ROWS: dict[torch.dtype, int] = (
    dict.fromkeys(_MEASURED_INT4_DENSE_MIN_ROWS, int(os.environ["K2SERVE_INT4_DENSE_MIN_ROWS"]))
    if "K2SERVE_INT4_DENSE_MIN_ROWS" in os.environ
    else dict(_MEASURED_INT4_DENSE_MIN_ROWS)
)

# Dense (bf16/fp32/fp16) routed experts on CPU: a call with at least this many (token, expert) rows runs
# as one grouped GEMM per weight over all of its experts (`torch._grouped_mm` over the rows sorted by
# expert, `offs` = the running row counts) instead of a Python loop of two small GEMMs per expert.
# Measured with `k2serve bench moe-grouped` (see BENCHMARKS.md, "Batched MoE"): the grouped path is
# as fast as the loop at batch 1 (8 rows on `small`) and faster from batch 8 on. The loop stays below
# the threshold and wherever `torch._grouped_mm` is missing or the tensors are not on the CPU.
# K2SERVE_MOE_GROUPED_MIN_ROWS, read at import, overrides it (a huge value keeps the loop everywhere).
_MEASURED_GROUPED_MIN_ROWS = 16
GROUPED_MIN_ROWS = int(os.environ.get("K2SERVE_MOE_GROUPED_MIN_ROWS", _MEASURED_GROUPED_MIN_ROWS))
HAS_GROUPED_MM = hasattr(torch.ops.aten, "_grouped_mm")
_grouped_mm = torch.ops.aten._grouped_mm if HAS_GROUPED_MM else None  # noqa: SLF001 (public in aten)


class Router(nn.Module):
    """noaux_tc: sigmoid scores; top-k chosen on scores + e_score_correction_bias (within the best
    `topk_group` of `n_group` groups, each scored by the sum of its top-2); weights are the unbiased
    scores of the chosen experts, optionally normalised, times routed_scaling_factor. Runs in fp32."""

    e_score_correction_bias: torch.Tensor  # a buffer [E]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.n_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights fp32 [T, k], expert ids int64 [T, k])."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [T, E]
        biased = scores + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = biased.view(-1, self.n_group, self.n_experts // self.n_group)  # [T, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            biased = biased.masked_fill(
                ~group_mask.repeat_interleave(self.n_experts // self.n_group, 1), float("-inf")
            )
        ids = biased.topk(self.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids


class RoutedExperts(nn.Module):
    """The routed experts of one layer held by this process, stacked for grouped execution.

    Dense:  w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I].
    INT4, layout "ct" (compressed-tensors, as on disk): w13_packed int32 [E, 2I, D/8], w13_scale [E, 2I, D/g],
            w2_packed [E, D, I/8], w2_scale [E, D, I/g]; each active expert is dequantised inside
            `run_sorted` just before its matmul (the portable path; GPU kernels read this layout).
    INT4, layout "cpu" (torch's CPU int4 tiles, same 4 bits per weight): w13_i4 uint8 [E, 2I, D/2],
            w13_sz [E, D/g, 2I, 2] (scale, zero=0), w2_i4 [E, D, I/2], w2_sz [E, I/g, D, 2]; an expert
            with fewer rows in a call than INT4_DENSE_MIN_ROWS[dtype] runs through the fused
            dequantising GEMM `aten._weight_int4pack_mm_for_cpu` without being expanded, one with
            more is dequantised for that call and runs through dense GEMMs (faster from there on).
    Either way the experts stay packed in memory (a dequantised expert lives for one call only);
    `set_int4_expert` fills one expert from the disk form.
    """

    # Buffers, registered in __init__: global_to_local always, the others by the layout in use.
    global_to_local: torch.Tensor
    w13_packed: torch.Tensor
    w13_scale: torch.Tensor
    w2_packed: torch.Tensor
    w2_scale: torch.Tensor
    w13_i4: torch.Tensor
    w13_sz: torch.Tensor
    w2_i4: torch.Tensor
    w2_sz: torch.Tensor

    def __init__(
        self,
        config: ModelConfig,
        expert_ids: Sequence[int] | None = None,
        int4_group_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        int4_layout: str = "ct",
    ) -> None:
        super().__init__()
        if int4_layout not in ("ct", "cpu"):
            raise ValueError(f"int4_layout must be 'ct' or 'cpu', got {int4_layout!r}")
        self.int4_layout = int4_layout
        self.n_global = config.n_routed_experts
        ids = list(range(self.n_global)) if expert_ids is None else list(expert_ids)
        self.expert_ids = ids  # sets holds_every_expert too
        e, d, i = len(ids), config.hidden_size, config.moe_intermediate_size
        self.hidden, self.inter = d, i
        self.int4_group_size = int4_group_size
        local = torch.full((self.n_global,), -1, dtype=torch.long)
        local[torch.tensor(ids, dtype=torch.long)] = torch.arange(e)
        self.register_buffer("global_to_local", local, persistent=False)
        if int4_group_size is None:
            self.w13 = nn.Parameter(torch.empty(e, 2 * i, d, dtype=dtype), requires_grad=False)
            self.w2 = nn.Parameter(torch.empty(e, d, i, dtype=dtype), requires_grad=False)
        elif int4_layout == "ct":
            g = int4_group_size
            self.register_buffer("w13_packed", torch.empty(e, 2 * i, d // 8, dtype=torch.int32))
            self.register_buffer("w13_scale", torch.empty(e, 2 * i, d // g, dtype=dtype))
            self.register_buffer("w2_packed", torch.empty(e, d, i // 8, dtype=torch.int32))
            self.register_buffer("w2_scale", torch.empty(e, d, i // g, dtype=dtype))
        else:
            g = int4_group_size
            self.register_buffer("w13_i4", torch.empty(e, 2 * i, d // 2, dtype=torch.uint8))
            self.register_buffer("w13_sz", torch.empty(e, d // g, 2 * i, 2, dtype=dtype))
            self.register_buffer("w2_i4", torch.empty(e, d, i // 2, dtype=torch.uint8))
            self.register_buffer("w2_sz", torch.empty(e, i // g, d, 2, dtype=dtype))
        self.compute_dtype = dtype
        self._int4_capturable: bool | None = None  # int4_native_capturable(), once asked
        self.moe_backend = "torch"  # "triton": `forward` and `run_sorted` go through the Triton kernels

    @property
    def expert_ids(self) -> list[int]:
        """The global ids of the experts held here, in local order."""
        return self._expert_ids

    @expert_ids.setter
    def expert_ids(self, ids: Sequence[int]) -> None:
        # set at construction and by a reshard (experts/reshard.py `install`): `holds_every_expert`
        # follows, so the eager step reads a flag instead of building a set every layer
        self._expert_ids = list(ids)
        self.holds_every_expert = len(set(self._expert_ids)) == self.n_global

    def set_moe_backend(self, backend: str) -> None:
        """Route `forward` and `run_sorted` through backend "torch" (the loops and grouped GEMMs here) or "triton"
        (model/triton_moe.py: dense or compressed-tensors INT4 experts; CPU int4 tiles cannot)."""
        if backend == "triton" and self.int4_group_size is not None and self.int4_layout != "ct":
            raise ValueError(
                "moe backend 'triton' reads INT4 experts in the compressed-tensors layout; these were "
                f"loaded in the {self.int4_layout!r} layout (load with int4_layout='ct')"
            )
        self.moe_backend = backend

    def triton_weights(self) -> tuple[ExpertWeight, ExpertWeight]:
        """w13 and w2 as the Triton kernels read them: (packed INT4, scales) or (dense, None)."""
        if self.int4_group_size is None:
            return (self.w13, None), (self.w2, None)
        return (self.w13_packed, self.w13_scale), (self.w2_packed, self.w2_scale)

    def run_triton(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """`run_sorted` through the Triton kernels (`fused_moe` with top-k 1 and no routing weights),
        whatever `moe_backend` says."""
        w13, w2 = self.triton_weights()
        return fused_moe(x, None, sorted_expert_ids(counts, x.device), w13, w2, self.inter)

    @torch.no_grad()
    def set_int4_expert(
        self,
        local: int,
        w13_packed: torch.Tensor,
        w13_scale: torch.Tensor,
        w2_packed: torch.Tensor,
        w2_scale: torch.Tensor,
    ) -> None:
        """Fill local expert `local` from the compressed-tensors form (packed int32 + scales)."""
        if self.int4_layout == "ct":
            self.w13_packed[local] = w13_packed
            self.w13_scale[local] = w13_scale
            self.w2_packed[local] = w2_packed
            self.w2_scale[local] = w2_scale
            return
        pack_int4_cpu_into(w13_packed, w13_scale, self.w13_i4[local], self.w13_sz[local])
        pack_int4_cpu_into(w2_packed, w2_scale, self.w2_i4[local], self.w2_sz[local])

    @property
    def num_local(self) -> int:
        return len(self.expert_ids)

    def _weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's w13 [2I, D] and w2 [D, I], dense in the compute dtype (INT4: dequantised now)."""
        if self.int4_group_size is None:
            return self.w13[e], self.w2[e]
        dt = self.compute_dtype
        if self.int4_layout == "cpu":
            w13_tiles, w2_tiles = self._int4_cpu_tiles()
            if w13_tiles is None or w2_tiles is None:  # _fused_int4 sends these experts to the fused GEMM
                raise RuntimeError(f"torch's INT4 CPU tile layout of expert {e} cannot be dequantised here")
            return (
                dequantize_int4pack_cpu(self.w13_i4[e], self.w13_sz[e, ..., 0], w13_tiles, dt).t(),
                dequantize_int4pack_cpu(self.w2_i4[e], self.w2_sz[e, ..., 0], w2_tiles, dt).t(),
            )
        return (
            dequantize_int4(self.w13_packed[e], self.w13_scale[e], dt),
            dequantize_int4(self.w2_packed[e], self.w2_scale[e], dt),
        )

    def _int4_cpu_tiles(self) -> tuple[Int4CpuTiles | None, Int4CpuTiles | None]:
        """Torch's tile layouts of w13 and w2 on this machine (probed once per shape, then cached)."""
        return int4pack_cpu_tiles(2 * self.inter, self.hidden), int4pack_cpu_tiles(self.hidden, self.inter)

    def _fused_int4(self, rows: int) -> bool:
        """Whether an expert with `rows` rows runs through torch's fused CPU INT4 kernel: INT4 in the
        "cpu" layout, and fewer rows than INT4_DENSE_MIN_ROWS[compute dtype] or tiles this torch lays
        out in a way `dequantize_int4pack_cpu` cannot read."""
        if self.int4_group_size is None or self.int4_layout != "cpu":
            return False
        if rows < INT4_DENSE_MIN_ROWS.get(self.compute_dtype, 1):
            return True
        return any(t is None for t in self._int4_cpu_tiles())

    def _swiglu(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x [n, D] -> [n, D]."""
        return self.swiglu_int4_fused(e, x) if self._fused_int4(x.shape[0]) else self.swiglu_dense(e, x)

    def swiglu_int4_fused(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x [n, D] through torch's fused CPU INT4 GEMM ("cpu" layout only)."""
        g = self.int4_group_size
        h = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.w13_i4[e], g, self.w13_sz[e])  # [n, 2I]
        gate, up = h.split(self.inter, dim=-1)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(F.silu(gate) * up, self.w2_i4[e], g, self.w2_sz[e])

    def swiglu_dense(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x [n, D] through dense GEMMs (INT4 experts are dequantised for this call)."""
        w13, w2 = self._weights(e)
        n = x.shape[0]
        if n > 0 and bucket(n) != n:  # pad rows to a bucket so the CPU GEMM reuses its kernels
            x = torch.cat((x, x.new_zeros(bucket(n) - n, x.shape[1])))
        gate, up = F.linear(x, w13).split(self.inter, dim=-1)  # [n, I] each
        return F.linear(F.silu(gate) * up, w2)[:n]

    def grouped_applies(self, x: torch.Tensor) -> bool:
        """Whether `run_sorted` runs rows x [N, D] as grouped GEMMs: dense experts, on the CPU, with
        torch's `_grouped_mm`, and at least GROUPED_MIN_ROWS rows."""
        return (
            HAS_GROUPED_MM
            and self.int4_group_size is None
            and x.device.type == "cpu"
            and x.shape[0] >= GROUPED_MIN_ROWS
        )

    def run_grouped(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """`run_sorted` for dense experts as two grouped GEMMs over all experts at once: x [N, D] sorted
        by local expert, `counts[e]` rows for expert e (zeros allowed) -> SwiGLU outputs [N, D]."""
        if self.int4_group_size is not None:
            raise ValueError("run_grouped needs dense (bf16/fp32) experts; INT4 experts use run_sorted")
        if len(counts) != self.num_local:
            raise ValueError(f"run_grouped: {len(counts)} counts for {self.num_local} local experts")
        if x.shape[0] == 0:
            return torch.empty_like(x)
        return self.grouped_swiglu(x, torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32))

    def grouped_swiglu(
        self, x: torch.Tensor, offs: torch.Tensor, mm: Callable[..., torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Two grouped GEMMs: x [N, D] sorted by local expert, offs [E] int32 running row counts ->
        [N, D]. `mm(x, w, offs)`: the grouped GEMM (default aten's `_grouped_mm`)."""
        if _grouped_mm is None:
            raise RuntimeError(f"torch {torch.__version__} has no aten._grouped_mm; use run_loop")
        mm = mm or (lambda a, w, o: _grouped_mm(a, w, offs=o))
        gate, up = mm(x, self.w13.transpose(1, 2), offs).split(self.inter, dim=-1)  # [N, I] each
        return mm(F.silu(gate) * up, self.w2.transpose(1, 2), offs)

    def run_sorted(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """x [N, D] sorted by local expert with `counts[e]` rows for expert e -> SwiGLU outputs [N, D].
        The Triton kernel under moe_backend "triton"; grouped GEMMs (`run_grouped`) where
        `grouped_applies`, else the loop over experts."""
        if self.moe_backend == "triton":
            return self.run_triton(x, counts)
        if self.grouped_applies(x):
            return self.run_grouped(x, counts)
        return self.run_loop(x, counts)

    def run_loop(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """`run_sorted` as a loop over the experts with rows, two GEMMs each (INT4: per-expert kernels)."""
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            out[start : start + n] = self._swiglu(e, x[start : start + n])
            start += n
        return out

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, D], routing weights/ids [T, k] (global ids; ids this process does not hold are skipped).
        Under torch.compile or a CUDA graph capture: `forward_static` (no host sync, static shapes), but
        a CUDA graph records the fused Triton kernels as they are (INT4 too). Else under moe_backend
        "triton" the gather of rows per expert and the weighted sum back run inside the kernels
        (`fused_moe`), without a host sync; in bf16 on the CPU the native kernels where they apply
        (`forward_native`); otherwise in torch around `run_sorted`."""
        if _capturing(x) and not (self.moe_backend == "triton" and x.is_cuda):
            return self.forward_static(x, weights, ids)
        if self.moe_backend == "triton":
            w13, w2 = self.triton_weights()
            local = self.global_to_local[ids]
            return fused_moe(x, weights, local, w13, w2, self.inter, skipped=self.num_local < self.n_global)
        native = self.forward_native(x, weights, ids)
        if native is not None:
            return native
        k = ids.shape[1]
        local = self.global_to_local[ids.flatten()]  # [T*k]
        held = (local >= 0).nonzero().squeeze(1)
        order = held[
            torch.argsort(local[held], stable=True)
        ]  # flat (token, slot) positions grouped by expert
        counts = torch.bincount(local[order], minlength=self.num_local).tolist()
        tokens = order // k
        y = self.run_sorted(x[tokens], counts)  # [N, D]
        y = y * weights.flatten()[order].unsqueeze(1).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, y)

    def forward_native(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor | None:
        """Eager `forward` through the native CPU kernels (model/cpu_kernels.py) where they apply: bf16
        on the CPU without autograd, every routed expert held here (`holds_every_expert`), the kernels
        available, and at most `compiled_gemv.native_moe_max_rows` (dense: 8 rows an expert, 256 on AMX) or
        `NATIVE_INT4_MAX_ROWS_PER_EXPERT` (INT4 in torch's CPU tiles) rows an expert; one call per layer,
        the outputs the captured step's kernels give. None where they do not apply (the torch paths)."""
        if (
            x.dtype != torch.bfloat16
            or x.device.type != "cpu"
            or (torch.is_grad_enabled() and x.requires_grad)
            or not self.holds_every_expert  # an EP rank's subset
        ):
            return None
        t, k = ids.shape
        if self.int4_group_size is None:
            if (
                self.w13.dtype != torch.bfloat16
                or not (self.w13.is_contiguous() and self.w2.is_contiguous())
                or not cpu_kernels.available()
                or t * k > compiled_gemv.native_moe_max_rows(self.num_local)
            ):
                return None
            local = self.global_to_local[ids]  # EPLB may hold the experts in another order
            return cpu_kernels.routed_bf16(x, weights, local, self.w13, self.w2)
        if (
            t * k > compiled_gemv.NATIVE_INT4_MAX_ROWS_PER_EXPERT * self.num_local
            or not self.int4_native_capturable()
        ):
            return None
        return self.routed_int4(x, weights, self.global_to_local[ids])

    def routed_int4(self, x: torch.Tensor, weights: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """These INT4 experts (torch's CPU tiles) on x through the native kernels, `local` the ids in
        this module's expert order."""
        assert self.int4_group_size is not None
        return cpu_kernels.routed_int4(
            x, weights, local, self.w13_i4, self.w13_sz, self.w2_i4, self.w2_sz, self.int4_group_size
        )

    def int4_native_capturable(self) -> bool:
        """Whether a captured CPU step can run these INT4 experts: bf16, torch's CPU tiles ("cpu"
        layout) of the form `cpu_kernels.moe_int4` reads, and the native kernels available. Found on
        the first (eager) call and kept: a traced forward reads the stored answer."""
        if self._int4_capturable is None:
            self._int4_capturable = (
                self.int4_group_size is not None
                and self.int4_layout == "cpu"
                and self.compute_dtype == torch.bfloat16
                and self.w13_i4.device.type == "cpu"
                and cpu_kernels.available()
                and cpu_kernels.int4_shapes_supported(self.hidden, self.inter, self.int4_group_size)
            )
        return self._int4_capturable

    def int4_native_applies(self, x: torch.Tensor, rows: int) -> bool:
        """Whether `forward_static` runs these INT4 experts on `rows` (token, expert) rows through the
        native kernel now: capturable, and the captured step's native kernels on for that many rows."""
        return (
            compiled_gemv.native_on()
            and x.dtype == torch.bfloat16
            and rows <= compiled_gemv.native_int4_rows(self.num_local)
            and self.int4_native_capturable()
        )

    def forward_static(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """`forward` with every shape fixed by x's (the captured decode step, engine/captured.py): all
        the experts held here; INT4 ones only through `cpu_kernels.moe_int4` or, from two tokens on,
        `moe_int4_grouped` (`int4_native_applies`),
        dense ones any of these ways, fixed by the shapes too:
        - on the CPU, at most `compiled_gemv.gather_rows(dtype)` (token, expert) rows, when the captured
          step turned it on: per-row GEMVs as reductions over the weights indexed by the ids
          (`compiled_gemv.gathered_experts`; compiled, one loop streams the k routed experts), or the
          native kernels there, in bf16 up to `compiled_gemv.native_moe_max_rows` (8 rows an expert, 256
          where AMX runs);
        - torch's `_grouped_mm` on the CPU (any dtype, through `grouped_mm_op`) or bf16 CUDA: the
          T * k (token, expert) rows sorted by expert, one grouped GEMM per weight, offsets computed
          on the device (no host sync);
        - fewer rows T * k than experts: each row's expert weights gathered ([T * k, 2I, D]) and run
          as batched GEMVs (reads the routed experts only, as the eager loop does);
        - else a loop over the static expert count, each expert on every token, weighted by that
          token's routing weight (0 where not routed)."""
        t, k = ids.shape
        if self.num_local != self.n_global:
            raise ValueError("forward_static needs all the routed experts held by this process")
        if self.int4_group_size is not None:
            if not self.int4_native_applies(x, t * k):
                raise ValueError(
                    "forward_static takes INT4 experts only through the native CPU kernel (bf16, torch's "
                    "CPU tiles, at most compiled_gemv.native_int4_rows rows, kernels on)"
                )
            return self.routed_int4(x, weights, ids)
        if x.device.type == "cpu" and (
            t * k <= compiled_gemv.gather_rows(x.dtype)
            or (
                compiled_gemv.native_moe(x.dtype, t * k, self.num_local)
                and self.w13.is_contiguous()
                and self.w2.is_contiguous()
            )
        ):
            return compiled_gemv.gathered_experts(x, weights, ids, self.w13, self.w2)
        flat = ids.flatten()  # [T * k] global = local ids
        if _grouped_mm is not None and (x.device.type == "cpu" or x.dtype == torch.bfloat16):
            order = torch.argsort(flat, stable=True)
            counts = torch.zeros(self.num_local, dtype=torch.int32, device=x.device)
            counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
            tokens = order // k
            y = self.grouped_swiglu(x[tokens], counts.cumsum(0, dtype=torch.int32), grouped_mm_op)
            y = y * weights.flatten()[order].unsqueeze(1).to(y.dtype)
            return torch.zeros_like(x).index_add_(0, tokens, y)
        if t * k < self.num_local:
            rows = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [T * k, D, 1]
            gate, up = torch.bmm(self.w13[flat], rows).squeeze(-1).split(self.inter, dim=-1)
            y = torch.bmm(self.w2[flat], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)  # [T * k, D]
            return (y.view(t, k, -1) * weights.unsqueeze(-1).to(y.dtype)).sum(1)
        dense = torch.zeros(t, self.num_local, dtype=weights.dtype, device=x.device)
        dense.scatter_(1, ids, weights)  # [T, E]: each token's weight per expert
        out = torch.zeros_like(x)
        for e in range(self.num_local):
            gate, up = F.linear(x, self.w13[e]).split(self.inter, dim=-1)
            out = out + F.linear(F.silu(gate) * up, self.w2[e]) * dense[:, e : e + 1].to(x.dtype)
        return out


@torch.library.custom_op("k2serve::grouped_mm", mutates_args=())
def grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`aten._grouped_mm(x, w, offs=offs)` as an opaque op: torch.compile calls it as it is (its own
    fake kernel below), where aten's meta kernel accepts bf16 only though the CPU kernel runs fp32."""
    if _grouped_mm is None:
        raise RuntimeError(f"torch {torch.__version__} has no aten._grouped_mm")
    return _grouped_mm(x, w, offs=offs)


@grouped_mm_op.register_fake
def _grouped_mm_shape(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


def _capturing(x: torch.Tensor) -> bool:
    """Whether this forward is being traced by torch.compile or captured into a CUDA graph."""
    if torch.compiler.is_compiling():
        return True
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class RoutedDispatch(Protocol):
    """Runs a layer's routed experts elsewhere (e.g. across an expert-parallel group, `k2serve.experts`).

    Same contract as `RoutedExperts.forward`: x [T, D] (T may be 0), routing weights fp32 / global ids
    [T, k] -> the weighted sum of the routed experts' outputs [T, D]; `experts` are this process's own.
    """

    def __call__(
        self, experts: RoutedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor: ...


class MoE(nn.Module):
    """gate + routed experts + shared experts. `dispatch`, when set, computes the routed part instead of
    `experts` alone (expert parallelism); None (the default) is the single-process path."""

    def __init__(
        self,
        config: ModelConfig,
        expert_ids: Sequence[int] | None = None,
        int4_group_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        int4_layout: str = "ct",
    ) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = RoutedExperts(config, expert_ids, int4_group_size, dtype, int4_layout)
        self.shared_experts = (
            DenseMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.dispatch: RoutedDispatch | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        weights, ids = self.gate(x)
        y = (
            self.experts(x, weights, ids)
            if self.dispatch is None
            else self.dispatch(self.experts, x, weights, ids)
        )
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)
