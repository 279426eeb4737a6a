"""Grouped expert GEMMs in Triton: INT4 with the dequantisation fused, and dense (bf16/fp32) weights.

`grouped_gemm_int4(x, packed, scale, counts)`: rows of x [N, K] come grouped by expert (`counts[e]`
rows for expert e, in order); expert e's weight is packed INT4 (compressed-tensors `pack-quantized`:
int32 [E, O, K/8], nibble j of a word = value + 8 at bits 4j..4j+3; scales [E, O, K/group]).
Returns x_e @ W_e^T per group, [N, O]. The kernel reads the packed words and scales directly and
unpacks in registers, so no dense copy of the weight is ever written. `grouped_gemm_dense(x, w, counts)`:
the same over dense weights [E, O, K] (the same kernel, its INT4 branch compiled out).
`grouped_swiglu(x, counts, ...)`: the routed experts' SwiGLU step (w13, silu(gate) * up, w2) on them,
what `RoutedExperts.run_sorted` runs under `--moe-backend triton`.

Backends: "torch" (dequantise one expert at a time, then F.linear: the reference, and the CPU
default), "triton" (the kernel: on GPU, or on CPU tensors under TRITON_INTERPRET=1 for testing),
"auto" (triton for CUDA tensors when triton imports, else torch). The weight is dequantised to the
activations' dtype (as the torch path does) and the GEMM accumulates in fp32: fp32 operands without
TF32; bf16 operands natively on GPU, and as fp32 under the interpreter (whose dot mishandles bf16:
same bf16 values, so results still match up to summation order). Triton is imported lazily and the
kernel built on first use, so TRITON_INTERPRET set before that first use takes effect. Blocks are
16 x 32 x 32 everywhere (the configuration the interpreter tests); tuning for GPUs is open.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from k2serve.model.quant import dequantize_int4
from k2serve.model.triton_attention import triton_refusal

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32
MOE_BACKENDS = ("torch", "triton")


class MoEBackendError(ValueError):
    """`--moe-backend` names an unknown backend, or triton where it cannot run."""


def check_moe_backend(backend: str, device: torch.device) -> None:
    """Raise MoEBackendError when the routed experts cannot run `backend` on `device` (mirrors the
    attention backend's check: triton needs CUDA tensors or TRITON_INTERPRET=1)."""
    if backend not in MOE_BACKENDS:
        raise MoEBackendError(f"moe backend must be one of {', '.join(MOE_BACKENDS)}, got {backend!r}")
    reason = None if backend == "torch" else triton_refusal("moe backend", "--moe-backend", device)
    if reason is not None:
        raise MoEBackendError(reason)


class GroupedGemmError(ValueError):
    """Shapes or options of a grouped GEMM call are inconsistent; carries the offending value."""

    def __init__(self, message: str, value: object) -> None:
        super().__init__(f"{message}: {value!r}")
        self.value = value


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _torch_grouped(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, counts: Sequence[int]
) -> torch.Tensor:
    out = x.new_empty(x.shape[0], packed.shape[1])  # [N, O]
    start = 0
    for e, n in enumerate(counts):
        if n:
            w = dequantize_int4(packed[e], scale[e], x.dtype)  # [O, K]
            out[start : start + n] = F.linear(x[start : start + n], w)
            start += n
    return out


@functools.cache
def _kernel(interpret: bool) -> Any:  # a triton JITFunction: kernel[grid](...)
    """Build the kernel (once per interpreter setting: triton decides at decoration time)."""
    del interpret  # part of the cache key only
    import triton
    import triton.language as tl

    @triton.jit
    def grouped_int4(
        x_ptr, packed_ptr, scale_ptr, out_ptr, tile_expert_ptr, tile_row_ptr, expert_end_ptr,
        n_out, k_dim, stride_pe, stride_se, group: tl.constexpr, ieee: tl.constexpr,
        bm: tl.constexpr, bn: tl.constexpr, bk: tl.constexpr, int4: tl.constexpr,
    ):  # fmt: skip
        tile = tl.program_id(0)
        e = tl.load(tile_expert_ptr + tile)
        rows = (tl.load(tile_row_ptr + tile) + tl.arange(0, bm)).to(
            tl.int64
        )  # [bm], int64: N * K may pass 2**31
        cols = tl.program_id(1) * bn + tl.arange(0, bn)  # [bn]
        row_ok = rows < tl.load(expert_end_ptr + e)
        col_ok = cols < n_out
        acc = tl.full((bm, bn), 0.0, dtype=tl.float32)  # not tl.zeros: a jit helper, which breaks the
        # interpreter when triton.language was imported before TRITON_INTERPRET was set
        for k0 in range(0, k_dim, bk):
            ks = k0 + tl.arange(0, bk)  # [bk]
            k_ok = ks < k_dim
            a = tl.load(
                x_ptr + rows[:, None] * k_dim + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            w_mask = col_ok[:, None] & k_ok[None, :]
            if int4:
                words = tl.load(
                    packed_ptr + e * stride_pe + cols[:, None] * (k_dim // 8) + (ks // 8)[None, :],
                    mask=w_mask,
                    other=0,
                )  # [bn, bk] int32, each word read for its 8 values
                q = ((words >> ((ks % 8) * 4)[None, :]) & 0xF) - 8
                s = tl.load(
                    scale_ptr + e * stride_se + cols[:, None] * (k_dim // group) + (ks // group)[None, :],
                    mask=w_mask,
                    other=0.0,
                )
                w = (q.to(tl.float32) * s.to(tl.float32)).to(a.dtype)  # [bn, bk] dequantised in registers
            else:  # dense weights [E, O, K] (packed_ptr): read as they are
                w = tl.load(
                    packed_ptr + e * stride_pe + cols[:, None] * k_dim + ks[None, :], mask=w_mask, other=0.0
                ).to(a.dtype)
            if ieee:  # fp32 operands without TF32 (and bf16 under the interpreter, whose dot mishandles it)
                acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:  # bf16 / fp16 operands, fp32 accumulation
                acc += tl.dot(a, tl.trans(w))
        out = out_ptr + rows[:, None] * n_out + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    return grouped_int4


def _triton_grouped(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, counts: Sequence[int]
) -> torch.Tensor:
    """The kernel over rows grouped by expert: `weight` packed INT4 [E, O, K/8] with `scale`, or dense
    [E, O, K] with scale None."""
    e, o, k = weight.shape[0], weight.shape[1], x.shape[1]
    out = x.new_empty(x.shape[0], o)  # [N, O]
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    tiles = [(i, r) for i in range(e) for r in range(starts[i], starts[i + 1], BLOCK_M)]
    if not tiles:
        return out
    dev = x.device
    tile_expert = torch.tensor([t[0] for t in tiles], dtype=torch.int32, device=dev)
    tile_row = torch.tensor([t[1] for t in tiles], dtype=torch.int32, device=dev)
    expert_end = torch.tensor(starts[1:], dtype=torch.int32, device=dev)
    weight = weight.contiguous()
    scale = weight if scale is None else scale.contiguous()  # dense: an unused pointer
    group = k // scale.shape[2] if weight.dtype == torch.int32 else 1
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    kernel = _kernel(interpret)
    grid = (len(tiles), -(-o // BLOCK_N))
    kernel[grid](
        x.contiguous(), weight, scale, out, tile_expert, tile_row, expert_end, o, k,
        weight.stride(0), scale.stride(0), group=group, ieee=interpret or x.dtype == torch.float32,
        bm=BLOCK_M, bn=BLOCK_N, bk=BLOCK_K, int4=weight.dtype == torch.int32,
    )  # fmt: skip
    return out


def grouped_gemm_int4(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, counts: Sequence[int], backend: str = "auto"
) -> torch.Tensor:
    """x [N, K] grouped by expert (counts[e] rows each, sum = N), packed int32 [E, O, K/8], scale
    [E, O, K/group] -> [N, O] in x's dtype, each group multiplied by its expert's dequantised weight."""
    if packed.dtype != torch.int32 or packed.dim() != 3 or packed.shape[2] * 8 != x.shape[1]:
        raise GroupedGemmError(
            f"packed must be int32 [E, O, {x.shape[1] // 8}]", (packed.dtype, tuple(packed.shape))
        )
    if scale.shape[:2] != packed.shape[:2] or x.shape[1] % scale.shape[2]:
        raise GroupedGemmError(
            f"scale must be [E, O, K/group] for packed {tuple(packed.shape)}", tuple(scale.shape)
        )
    if len(counts) != packed.shape[0] or sum(counts) != x.shape[0]:
        raise GroupedGemmError(
            f"counts must have {packed.shape[0]} entries summing to {x.shape[0]}", list(counts)
        )
    if backend == "auto":
        backend = "triton" if x.is_cuda and triton_available() else "torch"
    if backend == "torch":
        return _torch_grouped(x, packed, scale, counts)
    if backend == "triton":
        return _triton_grouped(x, packed, scale, counts)
    raise GroupedGemmError("backend must be auto, torch or triton", backend)


def grouped_gemm_dense(
    x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int], backend: str = "triton"
) -> torch.Tensor:
    """x [N, K] grouped by expert (counts[e] rows each), dense weight [E, O, K] -> [N, O] in x's dtype
    (fp32 accumulation). backend "torch": one F.linear per expert (the reference)."""
    if weight.dim() != 3 or weight.shape[2] != x.shape[1] or not weight.is_floating_point():
        raise GroupedGemmError(
            f"weight must be a float [E, O, {x.shape[1]}]", (weight.dtype, tuple(weight.shape))
        )
    if len(counts) != weight.shape[0] or sum(counts) != x.shape[0]:
        raise GroupedGemmError(
            f"counts must have {weight.shape[0]} entries summing to {x.shape[0]}", list(counts)
        )
    if backend == "triton":
        return _triton_grouped(x, weight, None, counts)
    if backend != "torch":
        raise GroupedGemmError("backend must be torch or triton", backend)
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for e, n in enumerate(counts):
        out[start : start + n] = F.linear(x[start : start + n], weight[e].to(x.dtype))
        start += n
    return out


def grouped_swiglu(
    x: torch.Tensor,
    counts: Sequence[int],
    inter: int,
    w13: tuple[torch.Tensor, torch.Tensor | None],
    w2: tuple[torch.Tensor, torch.Tensor | None],
) -> torch.Tensor:
    """The routed experts' step through the Triton kernel: x [N, D] grouped by expert -> SwiGLU
    outputs [N, D]. w13 / w2: (packed INT4, scales) or (dense weights, None); w13's rows are gate then
    up (`inter` each)."""

    def gemm(a: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        weight, scale = w
        if scale is None:
            return grouped_gemm_dense(a, weight, counts)
        return grouped_gemm_int4(a, weight, scale, counts, "triton")

    gate, up = gemm(x, w13).split(inter, dim=-1)  # [N, I] each
    return gemm(F.silu(gate) * up, w2)  # [N, D]
