"""The routed experts as Triton kernels in vLLM's fused_moe layout: INT4 W4A16 (group 32, dequantised in
registers) and dense (bf16/fp32) weights, with the routing's gather and weighted scatter in the kernels.

`fused_moe(x, weights, ids, w13, w2, inter)`: x [T, D], routing weights [T, k] and local expert ids
[T, k] (-1: an expert this process does not hold, skipped) -> sum_k weight * SwiGLU_expert(x_t), [T, D].
1. `moe_align` sorts the T*k (token, slot) rows by expert on the device (no host sync, so a CUDA graph
   can capture it): `sorted_ids` [P] lists row ids t*k+j grouped by expert, each expert's run padded to
   a multiple of BLOCK_M with the sentinel T*k; `block_expert` [P/BLOCK_M] names each M block's expert;
   `n_padded` [1] is the padded length actually used (P is its bound: T*k + min(E, T*k)*(BLOCK_M-1)).
2. gate_up (the kernel with pair 2): each M block loads its A rows straight from x by sorted_id // k
   (no gathered copy of x), multiplies by the expert's gate and up rows of w13 in one pass (a tile
   interleaving gate and up rows of the same columns, one fp32 accumulator split at the end) and writes silu(gate) * up, [T*k, I], at row sorted_id: the SwiGLU is fused, so the
   [T*k, 2I] pre-activation never reaches memory.
3. down (the kernel, weighted): rows of that intermediate by sorted_id times w2, times the row's routing
   weight (fp32, before rounding), stored at row sorted_id of a [T, k, D] output; the sum over k is a
   torch `sum(1)` after (deterministic: no atomics).
INT4 experts are compressed-tensors `pack-quantized` (int32 [E, O, K/8], nibble j of a word = value + 8
at bits 4j..4j+3; scales [E, O, K/group]); the kernel reads the packed words and scales and unpacks in
registers, so no dense copy of a weight is ever written. Dense experts: [E, O, K] read as they are.

The same kernel without SwiGLU, weights or a row division is a plain grouped GEMM: `grouped_gemm_int4` /
`grouped_gemm_dense` (rows already grouped by expert, `counts[e]` each) and `fused_moe` with top-k 1
and no weights, what the expert-parallel dispatcher runs on the rows it received (`RoutedExperts.run_sorted`).

Numerics: weights are dequantised to the activations' dtype (as the torch path does) and the GEMMs
accumulate in fp32: fp32 operands without TF32; bf16 operands natively on GPU, and widened to fp32 under
the interpreter (whose bf16 dot returns garbage in triton 3.9: same bf16 values, so results match up to
summation order). Triton is imported lazily and the kernel built on first use, so TRITON_INTERPRET set
before that first use takes effect. Blocks: BLOCK_M = 16 rows (the decode case: T*k rows spread over
many experts); BLOCK_N x BLOCK_K = 64 x 64 on a GPU (untuned: no GPU was at hand), and under the
interpreter as wide as the dims up to 256 (fewer, larger ops: see `_blocks`). SiLU-and-mul is fused
into the gate_up pass rather than a separate op: a separate one would write [T*k, 2I], read it back
and write [T*k, I] (`k2serve bench moe-traffic` counts the bytes); the fused pass reads no more weight
bytes (gate and up rows of the same columns share one interleaved tile).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from k2serve.model.quant import dequantize_int4
from k2serve.model.triton_attention import interpreting, triton_refusal

BLOCK_M = 16  # rows per M block, the alignment's padding unit
GPU_BLOCKS_NK = (64, 64)  # BLOCK_N x BLOCK_K compiled for a GPU (untuned)
INTERPRETER_MAX_BLOCK = 256  # under TRITON_INTERPRET=1 each op costs ~1 ms of Python whatever its size:
# tiles as wide as the dims up to this take K2's 7168-wide rows in 28 steps instead of 112 (same code)


def _blocks(n_out: int, k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of a pass: GPU_BLOCKS_NK, or under the interpreter the dims' next powers of
    two (at least 16, tl.dot's minimum) up to INTERPRETER_MAX_BLOCK."""
    if not interpreting():
        return GPU_BLOCKS_NK
    bn, bk = (min(INTERPRETER_MAX_BLOCK, max(16, 1 << (n - 1).bit_length())) for n in (n_out, k))
    return bn, bk


MOE_BACKENDS = ("torch", "triton")

# An expert weight for the kernel: (packed INT4 int32 [E, O, K/8], scales [E, O, K/group]) or
# (dense [E, O, K], None).
ExpertWeight = tuple[torch.Tensor, torch.Tensor | None]


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
    """Shapes or options of a grouped GEMM / fused MoE call are inconsistent; carries the offending value."""

    def __init__(self, message: str, value: object) -> None:
        super().__init__(f"{message}: {value!r}")
        self.value = value


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class Alignment:
    """(token, slot) rows sorted by expert and padded per expert to BLOCK_M (see the module docstring)."""

    sorted_ids: torch.Tensor  # int32 [P]: row ids grouped by expert; the sentinel n_rows pads each run
    block_expert: torch.Tensor  # int32 [P / block_m]: the expert of each M block
    n_padded: torch.Tensor  # int32 [1]: the padded rows in use; M blocks from there on do nothing
    n_rows: int  # rows routed (T*k): the sentinel
    block_m: int


def moe_align(expert_of_row: torch.Tensor, n_experts: int, block_m: int = BLOCK_M) -> Alignment:
    """Sort rows by expert, as vLLM's `moe_align_block_size`, in torch ops on the rows' device (no host
    sync): `expert_of_row` [N] holds each row's local expert in [0, n_experts), or -1 for a row no held
    expert takes (left out). Rows of one expert keep their order."""
    n = expert_of_row.numel()
    dev = expert_of_row.device
    key = torch.where(expert_of_row >= 0, expert_of_row, n_experts).long()  # skipped rows sort last
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=dev)  # not bincount: on CUDA it syncs
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:n_experts]  # [E] (for its output size)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)  # [E] padded end of each expert's run
    order = torch.argsort(key, stable=True)  # [N]
    sorted_key = key[order]
    expert = sorted_key.clamp(max=n_experts - 1)
    rank = torch.arange(n, device=dev) - (counts.cumsum(0) - counts)[expert]  # position within the expert
    bound = -(-(n + min(n_experts, n) * (block_m - 1)) // block_m) * block_m  # P
    dest = torch.where(sorted_key < n_experts, ends[expert] - padded[expert] + rank, bound)
    sorted_ids = torch.full((bound + 1,), n, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)  # skipped rows land on the extra last slot, dropped
    block_start = torch.arange(0, bound, block_m, device=dev)
    block_expert = torch.searchsorted(ends, block_start, right=True).clamp(max=n_experts - 1)
    return Alignment(sorted_ids[:bound], block_expert.to(torch.int32), ends[-1:].to(torch.int32), n, block_m)


@functools.cache
def _kernel(interpret: bool) -> Any:  # a triton JITFunction: kernel[grid](...)
    """The kernel, imported on first use: triton decides whether to interpret when it decorates it,
    so TRITON_INTERPRET must be set before (the module is imported once)."""
    del interpret  # part of the cache key only
    from k2serve.model import triton_moe_kernels

    return triton_moe_kernels.fused_moe


def _launch(
    a: torch.Tensor,
    weight: ExpertWeight,
    out: torch.Tensor,
    align: Alignment,
    *,
    a_div: int = 1,
    swiglu: bool = False,
    route: torch.Tensor | None = None,
) -> None:
    """One kernel pass: out[id] = act(a[id // a_div] @ W_e^T) (* route[id]) for every aligned row id.
    out's columns are the pass's outputs (swiglu: the weight has twice as many rows)."""
    w, scale = weight
    w = w.contiguous()
    scale = w if scale is None else scale.contiguous()  # dense: an unused pointer
    int4 = w.dtype == torch.int32
    k = a.shape[1]
    n_out = out.shape[1]
    bn, bk = _blocks(n_out, k)
    grid = (align.sorted_ids.numel() // align.block_m, -(-n_out // bn))
    _kernel(interpreting())[grid](
        a.contiguous(), w, scale, out, align.sorted_ids if route is None else route, align.sorted_ids,
        align.block_expert, align.n_padded, align.n_rows, n_out, k, w.stride(0), w.stride(1), scale.stride(0),
        scale.stride(1), a_div, group=k // scale.shape[2] if int4 else 1, pair=2 if swiglu else 1,
        weighted=route is not None, int4=int4,
        widen=interpreting(), ieee=interpreting() or a.dtype == torch.float32, bm=align.block_m, bn=bn, bk=bk,
    )  # fmt: skip


def _check_weight(name: str, weight: ExpertWeight, rows: int, k: int) -> None:
    """weight must be expert rows [E, rows, k]: packed INT4 with scales [E, rows, k/group], or dense."""
    w, scale = weight
    if scale is None:
        if w.dim() != 3 or tuple(w.shape[1:]) != (rows, k) or not w.is_floating_point():
            raise GroupedGemmError(f"{name} must be a float [E, {rows}, {k}]", (w.dtype, tuple(w.shape)))
        return
    if w.dtype != torch.int32 or w.dim() != 3 or tuple(w.shape[1:]) != (rows, k // 8):
        raise GroupedGemmError(
            f"{name} packed must be int32 [E, {rows}, {k // 8}]", (w.dtype, tuple(w.shape))
        )
    if scale.shape[:2] != w.shape[:2] or scale.dim() != 3 or k % scale.shape[2]:
        raise GroupedGemmError(f"{name} scale must be [E, {rows}, K/group]", tuple(scale.shape))


def fused_moe(
    x: torch.Tensor,
    weights: torch.Tensor | None,
    ids: torch.Tensor,
    w13: ExpertWeight,
    w2: ExpertWeight,
    inter: int,
    *,
    skipped: bool = False,
) -> torch.Tensor:
    """The routed experts of one layer through the two kernels: x [T, D], routing `weights` [T, k]
    (None: every weight 1) and local expert `ids` [T, k] -> sum over k of weight * SwiGLU_e(x_t),
    [T, D] in x's dtype. w13 rows are gate then up (`inter` each), w2 is [E, D, inter] (see
    ExpertWeight). `skipped`: ids may hold -1 (an expert not held here, contributing nothing), so
    the per-slot output starts zeroed; the caller says so rather than this reading ids on the host."""
    t, d = x.shape
    if ids.dim() != 2 or ids.shape[0] != t:
        raise GroupedGemmError(f"ids must be [{t}, top_k]", tuple(ids.shape))
    if weights is not None and weights.shape != ids.shape:
        raise GroupedGemmError(f"weights must be {tuple(ids.shape)} like ids", tuple(weights.shape))
    _check_weight("w13", w13, 2 * inter, d)
    _check_weight("w2", w2, d, inter)
    n_experts, top_k = w13[0].shape[0], ids.shape[1]
    if w2[0].shape[0] != n_experts:
        raise GroupedGemmError(f"w2 must hold the {n_experts} experts of w13", tuple(w2[0].shape))
    out = (torch.zeros if skipped else torch.empty)(t, top_k, d, dtype=x.dtype, device=x.device)
    if t == 0:
        return out.sum(1)
    align = moe_align(ids.flatten(), n_experts)
    act = x.new_empty(t * top_k, inter)  # silu(gate) * up of each (token, slot) row
    _launch(x, w13, act, align, a_div=top_k, swiglu=True)
    route = None if weights is None else weights.flatten().float().contiguous()
    _launch(act, w2, out.view(t * top_k, d), align, route=route)
    return out[:, 0] if top_k == 1 else out.sum(1)


def sorted_expert_ids(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """[N, 1] local expert of each row of rows grouped by expert (`counts[e]` rows for expert e)."""
    sizes = torch.tensor(list(counts), dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(counts), device=device), sizes).unsqueeze(1)


def _grouped_gemm(x: torch.Tensor, weight: ExpertWeight, counts: Sequence[int]) -> torch.Tensor:
    """x [N, K] grouped by expert -> x_e @ W_e^T per group, [N, O], through the kernel's plain mode."""
    out = x.new_empty(x.shape[0], weight[0].shape[1])
    if x.shape[0]:
        _launch(x, weight, out, moe_align(sorted_expert_ids(counts, x.device).flatten(), len(counts)))
    return out


def _check_counts(counts: Sequence[int], n_experts: int, rows: int) -> None:
    if len(counts) != n_experts or sum(counts) != rows or min(counts, default=0) < 0:
        raise GroupedGemmError(f"counts must have {n_experts} entries summing to {rows}", list(counts))


def grouped_gemm_int4(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, counts: Sequence[int], backend: str = "auto"
) -> torch.Tensor:
    """x [N, K] grouped by expert (counts[e] rows each, sum = N), packed int32 [E, O, K/8], scale
    [E, O, K/group] -> [N, O] in x's dtype, each group multiplied by its expert's dequantised weight.
    backend "torch": dequantise one expert at a time, then F.linear (the reference); "auto": triton for
    CUDA tensors when triton imports."""
    _check_weight("weight", (packed, scale), packed.shape[1] if packed.dim() == 3 else -1, x.shape[1])
    _check_counts(counts, packed.shape[0], x.shape[0])
    if backend == "auto":
        backend = "triton" if x.is_cuda and triton_available() else "torch"
    if backend == "triton":
        return _grouped_gemm(x, (packed, scale), counts)
    if backend != "torch":
        raise GroupedGemmError("backend must be auto, torch or triton", backend)
    return _torch_grouped(x, lambda e: dequantize_int4(packed[e], scale[e], x.dtype), packed.shape[1], counts)


def grouped_gemm_dense(
    x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int], backend: str = "triton"
) -> torch.Tensor:
    """x [N, K] grouped by expert (counts[e] rows each), dense weight [E, O, K] -> [N, O] in x's dtype
    (fp32 accumulation). backend "torch": one F.linear per expert (the reference)."""
    _check_weight("weight", (weight, None), weight.shape[1] if weight.dim() == 3 else -1, x.shape[1])
    _check_counts(counts, weight.shape[0], x.shape[0])
    if backend == "triton":
        return _grouped_gemm(x, (weight, None), counts)
    if backend != "torch":
        raise GroupedGemmError("backend must be torch or triton", backend)
    return _torch_grouped(x, lambda e: weight[e].to(x.dtype), weight.shape[1], counts)


def _torch_grouped(
    x: torch.Tensor, expert_weight: Callable[[int], torch.Tensor], n_out: int, counts: Sequence[int]
) -> torch.Tensor:
    """The torch reference of a grouped GEMM: F.linear per expert with rows, on `expert_weight(e)`."""
    out = x.new_empty(x.shape[0], n_out)
    start = 0
    for e, n in enumerate(counts):
        if n:
            out[start : start + n] = F.linear(x[start : start + n], expert_weight(e))
            start += n
    return out
