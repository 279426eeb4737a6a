"""Small-batch (GEMV-shaped) kernels for the compiled decode step on CPU (issue 16 item 2).

Inside the captured decode step (engine/captured.py, `--compile decode`) Inductor lowers every linear
layer to an extern `mm` on the plain weight and the routed experts to torch's CPU `_grouped_mm`, which
at a batch of one runs one `mm` per expert group, empty groups included (128 calls per MoE layer on
`small` for its 8 routed experts). Three replacements, all measured with paired rounds (BENCHMARKS.md,
"GEMV kernels inside the captured step"):

- **prepacked linears** (bf16): the eager step's `PrepackedLinear` layers (model/cpu_linear.py: oneDNN
  on a weight reordered once, F.linear's outputs bit for bit up to its row and input limits) keep their
  packed kernel inside the compiled graph, as the opaque op `k2serve::packed_linear` (Inductor's own
  lowering of `mkldnn._linear_pointwise` accepts only weights frozen into constants);
- **gathered expert GEMVs**: at T tokens with T * k <= `GATHER_MAX_ROWS[dtype]` (token, expert) rows,
  `gathered_experts` computes each row's SwiGLU as a reduction `(w[ids] * x).sum(-1)` in fp32 that
  Inductor turns into one vectorised loop reading the k routed experts' weights through the ids (no
  gathered copy, no per-expert dispatch);
- **native kernels** (bf16, where `cpu_kernels.available()`: AVX512-BF16 and a C compiler): the
  gathered expert GEMVs of up to `GATHER_MAX_ROWS` rows as one `cpu_kernels.moe_bf16` call per layer,
  and one-row linears as `cpu_kernels.linear_bf16` on the dense weight (`NATIVE_LINEAR_MAX_ROWS`).

All are trace-time choices: `options(...)` sets them around a compiled call, and dynamo guards on the
module globals read here, so two captured steps with different choices (the bench's A/B) keep
separate graphs. `K2SERVE_DECODE_GEMV=0`, read at import, makes "off" the default (the step as before);
`K2SERVE_CPU_KERNELS=0` keeps the first two without the native kernels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from k2serve.model import cpu_kernels

DEFAULT_ON = os.environ.get("K2SERVE_DECODE_GEMV", "1") != "0"

# (token, expert) rows up to which `RoutedExperts.forward_static` on the CPU runs the gathered GEMVs
# instead of the grouped GEMM, per compute dtype. `k2serve bench moe-grouped --static` (one `small` MoE
# layer's experts, E=64, k=8, D=1024, I=256, compiled both ways, 1 thread, 20 paired rounds, loaded
# host; BENCHMARKS.md): gathered / grouped time bf16 0.36 at B=1 (8 rows), 0.74 at 2, 0.81 at 4, 1.12
# at 8 (64 rows: each row reads its expert, an expert two tokens share is read twice); fp32 0.33 at
# B=1, 1.00-1.05 from B=2. So bf16 up to 32 rows, fp32 up to 8.
GATHER_MAX_ROWS: dict[torch.dtype, int] = {torch.bfloat16: 32, torch.float32: 8}

# A traced bf16 linear layer runs `cpu_kernels.linear_bf16` (with the native kernels on) instead of
# oneDNN's packed kernel at up to NATIVE_LINEAR_MAX_ROWS rows and NATIVE_LINEAR_MAX_WEIGHTS weights.
# Per call it costs ~14 us against the packed op's ~22 us; with the weights out of cache
# (benchmarks/native_gemv_probe.py, BENCHMARKS.md "Native GEMV kernels") it read `small`'s attention
# and dense-down layers 1.0-1.13x as fast as oneDNN at one row but lm_head (33M weights) and the dense
# gate_up (5.8M) at 0.90 / 0.93x, and at two or more rows 0.6-1.0x.
NATIVE_LINEAR_MAX_ROWS = 1

# bf16 (token, expert) rows per routed expert (on average: rows / experts) up to which a captured step on
# the CPU with the native kernels on runs its routed experts through them (`cpu_kernels.moe_bf16_grouped`
# from two tokens on: each routed expert's weights read once for all its rows, VDPBF16PS) instead of
# torch's grouped GEMM (oneDNN, AMX: the faster from ~12 rows an expert on). One MoE layer's experts,
# 2 threads, medians of 7 alternating pairs, quiet host (grouped GEMM time / native grouped time):
# `small` (E=64, k=8, D=1024, I=256) 3.3 at 1 token, 2.8 at 8, 1.8 at 32, 1.27 at 64 (8 rows an
# expert), 1.00 at 96, 0.88 at 128; `moe200m` (k=6, D=768, I=128) 5.5 at 1, 4.1 at 8, 2.0 at 64, 1.30
# at 128 (12 rows an expert).
NATIVE_MOE_MAX_ROWS_PER_EXPERT = 8
# The same limit where the CPU runs `cpu_kernels.moe_bf16_amx` (AMX tiles), for the eager prefill too:
# one `small` MoE layer, 2 threads, medians of 3 alternating rounds, torch grouped GEMM / AMX time 2.72 at
# 8 rows an expert (64 tokens), 1.99 at 64 (512), 1.48 at 256 (2,048 tokens, a whole prefill chunk)
# (benchmarks/moe_kernels_probe.py). Past it the grouped GEMM, whose scratch grows more slowly (the AMX
# kernel keeps an fp32 row per (token, expert)).
AMX_MOE_MAX_ROWS_PER_EXPERT = 256

# INT4 experts (torch's CPU tiles) of a captured step run only through the native kernels (Inductor does
# not trace torch's fused INT4 kernel), so a bucket of more rows runs eager. Up to this many rows an
# expert (on average) the native kernels are the faster (eager / native grouped time, one MoE layer,
# 2 threads, medians of 5 alternating pairs: `small` 2.5 at 1 token, 2.3 at 8, 1.9 at 32, 1.6 at 64,
# 1.36 at 128 (16 rows an expert); `moe200m` 3.2, 3.6, 2.7, 2.2, 1.7).
NATIVE_INT4_MAX_ROWS_PER_EXPERT = 16
NATIVE_LINEAR_MAX_WEIGHTS = 4 * 2**20
# Decode rows up to which the captured step's bf16 attention runs `cpu_kernels.mla_decode` (one call a
# layer, keys read in place) instead of torch's gather and bmm / einsum calls. One `small` layer, 2
# threads, medians of 100 calls, eager torch / kernel: 282 / 39 us at 1 row, 647 / 269 at 8, 2,522 /
# 2,295 at 64; in whole captured steps of `small` (benchmarks/decode_step_timing.py, alternating pairs)
# the same within noise at 4 to 64 rows, and against llama.cpp at batch 1 INT4-all `moe200m` went from
# 154 to 191 tok/s (BENCHMARKS.md, "INT4 on every linear layer"). Past 64 rows the gathered copy of the
# keys stays bounded by MAX_GATHER_BYTES and torch's bmm path keeps them.
NATIVE_ATTENTION_MAX_ROWS = 64

_on = False  # module globals on purpose: dynamo guards on the values a traced forward read
_native = False


@contextmanager
def options(on: bool, native: bool = True) -> Iterator[None]:
    """Turn both kernels on (or off) for the forward traced or run inside the block; with `native`,
    the bf16 expert GEMVs run as model/cpu_kernels.py's kernel where it is available (decided here,
    outside any trace: building it on first use is no part of a graph)."""
    global _on, _native  # noqa: PLW0603 (see _on)
    saved = _on, _native
    _on, _native = on, on and native and cpu_kernels.available()
    try:
        yield
    finally:
        _on, _native = saved


def packed_on() -> bool:
    """Whether a traced `PrepackedLinear` keeps its packed kernel (read at trace time, guarded)."""
    return _on


def native_on() -> bool:
    """Whether the native kernels are on for the forward traced or run now (`options`)."""
    return _native


def native_linear(rows: int, weights: int) -> bool:
    """Whether a traced bf16 linear layer of `rows` rows and `weights` weights runs
    `cpu_kernels.linear_bf16`."""
    return _native and rows <= NATIVE_LINEAR_MAX_ROWS and weights <= NATIVE_LINEAR_MAX_WEIGHTS


def native_attention(dtype: torch.dtype, cache_dtype: torch.dtype, rows: int, kv_rank: int) -> bool:
    """Whether a traced captured step's absorbed attention of `rows` bf16 decode rows runs
    `cpu_kernels.mla_decode` (one call a layer) instead of torch's gather, bmm and einsum calls."""
    return (
        _native
        and dtype == cache_dtype == torch.bfloat16
        and rows <= NATIVE_ATTENTION_MAX_ROWS
        and kv_rank % 16 == 0
    )


def native_moe_max_rows(experts: int) -> int:
    """The most (token, expert) rows over `experts` bf16 experts the native expert kernels take in place
    of torch's grouped GEMM: `AMX_MOE_MAX_ROWS_PER_EXPERT` an expert where AMX runs, else
    `NATIVE_MOE_MAX_ROWS_PER_EXPERT` (read once the kernels have loaded, as `options` and the eager
    path's `cpu_kernels.available()` check load them)."""
    per_expert = AMX_MOE_MAX_ROWS_PER_EXPERT if cpu_kernels.amx_on() else NATIVE_MOE_MAX_ROWS_PER_EXPERT
    return per_expert * experts


def native_moe(dtype: torch.dtype, rows: int, experts: int) -> bool:
    """Whether a traced forward's bf16 routed experts (`experts` of them) on `rows` (token, expert) rows
    run the native expert kernels (`gathered_experts`)."""
    return _native and dtype == torch.bfloat16 and rows <= native_moe_max_rows(experts)


def native_int4_rows(experts: int) -> int:
    """The most (token, expert) rows over `experts` INT4 experts a traced forward runs through the native
    kernels (0: off)."""
    return NATIVE_INT4_MAX_ROWS_PER_EXPERT * experts if _native else 0


def gather_rows(dtype: torch.dtype) -> int:
    """The most (token, expert) rows the gathered expert GEMVs take in `dtype` (0: off)."""
    return GATHER_MAX_ROWS.get(dtype, 0) if _on else 0


@torch.library.custom_op("k2serve::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """x [N, in] @ W.T (+ bias) through oneDNN on W packed by `mkldnn._reorder_linear_weight`: the eager
    `PrepackedLinear` kernel as an op Inductor calls as it is."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")  # noqa: SLF001


@packed_linear.register_fake
def _packed_linear_shape(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def gathered_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """`gathered_experts_torch`'s result; in bf16 with the native kernels on (`options`) and contiguous
    weights, computed by `cpu_kernels.moe_bf16` in one call (the same roundings, summed in another
    order; from two tokens on by `moe_bf16_grouped`, the same outputs bit for bit)."""
    if _native and x.dtype == torch.bfloat16 and w13.is_contiguous() and w2.is_contiguous():
        return cpu_kernels.routed_bf16(x, weights, ids, w13, w2)
    return gathered_experts_torch(x, weights, ids, w13, w2)


def gathered_experts_torch(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """The routed experts' weighted SwiGLU sum for x [T, D] (routing weights fp32 / ids [T, k], local =
    global), with w13 [E, 2I, D] and w2 [E, D, I], as per-(token, expert) GEMVs written as fp32
    reductions over the indexed weights. Each GEMV's output is rounded to x's dtype as F.linear's would
    be. Eager, `w13[ids]` is a gathered copy (slow; the tests run it so); compiled, Inductor reads the
    weights through the ids inside one loop. -> [T, D]."""
    t, k = ids.shape
    inter = w2.shape[-1]
    flat = ids.flatten()
    rows = x.repeat_interleave(k, dim=0).float().unsqueeze(1)  # [T * k, 1, D]
    h = (w13[flat].float() * rows).sum(-1).to(x.dtype)  # [T * k, 2I]
    gate, up = h.split(inter, dim=-1)
    act = (F.silu(gate) * up).float().unsqueeze(1)  # [T * k, 1, I]
    y = (w2[flat].float() * act).sum(-1).to(x.dtype)  # [T * k, D]
    return (y.view(t, k, -1) * weights.unsqueeze(-1).to(y.dtype)).sum(1)


def gathered_experts_int4_torch(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13_i4: torch.Tensor,
    w13_sz: torch.Tensor,
    w2_i4: torch.Tensor,
    w2_sz: torch.Tensor,
) -> torch.Tensor:
    """`gathered_experts_torch` for INT4 experts in torch's CPU tiles (the "cpu" layout: w13_i4 uint8
    [E, 2I, D/2], w13_sz [E, D/g, 2I, 2], w2_i4 [E, D, I/2], w2_sz [E, I/g, D, 2]): each routed expert
    dequantised to fp32, W = (q - 8) * scale + zero as torch's fused INT4 kernel forms it, and the
    same roundings (what `cpu_kernels.moe_int4` computes; the tests' reference, slow)."""
    from k2serve.model.quant import dequantize_int4pack_cpu, int4pack_cpu_tiles

    t, k = ids.shape
    d = x.shape[1]
    inter = w2_i4.shape[-1] * 2
    t13, t2 = int4pack_cpu_tiles(2 * inter, d), int4pack_cpu_tiles(d, inter)
    assert t13 is not None and t2 is not None
    out = []
    for row in range(t):
        acc = torch.zeros(d)
        for j in range(k):
            e = int(ids[row, j])
            w13 = dequantize_int4pack_cpu(w13_i4[e], w13_sz[e, ..., 0].float(), t13, torch.float32)
            w13 = w13 + w13_sz[e, ..., 1].float().repeat_interleave(d // w13_sz.shape[1], 0)
            w2 = dequantize_int4pack_cpu(w2_i4[e], w2_sz[e, ..., 0].float(), t2, torch.float32)
            w2 = w2 + w2_sz[e, ..., 1].float().repeat_interleave(inter // w2_sz.shape[1], 0)
            h = (x[row].float() @ w13).to(x.dtype)  # [2I]
            gate, up = h.split(inter)
            act = F.silu(gate) * up
            y = (act.float() @ w2).to(x.dtype)
            acc += (y * weights[row, j].to(x.dtype)).float()
        out.append(acc.to(x.dtype))
    return torch.stack(out)
