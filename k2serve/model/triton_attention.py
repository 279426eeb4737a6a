"""Paged MLA attention over the latent, absorbed, as a Triton kernel: `attend_absorbed` on the GPU.

`paged_absorbed(q_lat, q_pe, q_pos, pages, key_blocks, key_pos, scale)` computes exactly what
`attend_absorbed(q_lat, q_pe, q_pos, paged_tiles(pages, key_blocks, key_pos, ...), scale)` does (the
contract of `model/attention.py`): N work items, item n its Q query rows over the keys its blocks hold,
and returns the same `Partial` (out [N, Q, H, C] fp32 normalised, lse [N, Q, H] fp32), so split-K
items are merged by the existing `merge_partials`.

One program per (item, block of BLOCK_R query rows): rows are (query, head) pairs, so a decode item's
rows are its heads (heads per rank) and an absorbed prefill chunk's rows are all its queries' heads,
each row masked by its own query position. The program reads the item's keys BLOCK_T at a time straight
from the pool through `key_blocks` (key j of the item is slot j % block_size of block key_blocks[n, j //
block_size]: no gathered copy), scores [q_lat | q_pe] . [c_kv | k_pe] (two tl.dot: C and dr padded to
powers of two with masks, K2's 512 + 64 as they are), masks keys by position (key_pos > q_pos, padding
keys carry PAD_KEY_POS) and keeps an online softmax (running max, sum, fp32 accumulator [BLOCK_R, C])
with the torch path's -inf conventions: a row that sees no key gets out 0, lse -inf.

Precision: the latent is cast to the query's dtype (as the torch path does); products accumulate in
fp32. fp32 operands use tl.dot without TF32 (`input_precision="ieee"`); bf16 operands use tl.dot on
bf16 natively on GPU (P cast to bf16 for P.V, as the torch path casts P to the values' dtype). Under
TRITON_INTERPRET=1 bf16 operands are widened to fp32 before tl.dot, as `experts/triton_moe.py` does
(the interpreter's dot mishandles bf16): the same bf16 values, so results match up to summation order.
An fp8 pool (raw rows with scales) is not read by this kernel: the engine keeps the torch path for it.

Triton is imported lazily and the kernel built on first use, so TRITON_INTERPRET set before that takes
effect. `check_backend` tells a caller up front whether the kernel can run on a device.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import torch

from k2serve.model.attention import Partial

ATTENTION_BACKENDS = ("torch", "triton")
BLOCK_R = 16  # query rows (query x head) per program; tl.dot needs >= 16
BLOCK_T = 16  # keys per inner step


class AttentionBackendError(ValueError):
    """The attention backend asked for cannot run here, or its inputs are inconsistent."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(backend: str, device: torch.device) -> None:
    """Raise AttentionBackendError when `backend` cannot run on tensors on `device`: an unknown name,
    triton not importable, or CPU tensors without TRITON_INTERPRET=1 (the kernel needs CUDA)."""
    if backend not in ATTENTION_BACKENDS:
        raise AttentionBackendError(
            f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}"
        )
    if backend == "torch":
        return
    if importlib.util.find_spec("triton") is None:
        raise AttentionBackendError(
            "attention backend 'triton' needs the triton package (pip install triton) and CUDA tensors, "
            "or TRITON_INTERPRET=1 on CPU"
        )
    if device.type != "cuda" and not interpreting():
        raise AttentionBackendError(
            f"attention backend 'triton' needs CUDA or TRITON_INTERPRET=1: the model is on {device.type}; "
            "set TRITON_INTERPRET=1 to run the kernel in the (slow) interpreter, or use --attention-backend torch"
        )


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (n - 1).bit_length())


@functools.cache
def _kernel(interpret: bool) -> Any:  # a triton JITFunction: kernel[grid](...)
    """Build the kernel (once per interpreter setting: triton decides at decoration time)."""
    del interpret  # part of the cache key only
    import triton
    import triton.language as tl

    @triton.jit
    def absorbed_paged(
        q_ptr, pages_ptr, blocks_ptr, key_pos_ptr, q_pos_ptr, out_ptr, lse_ptr,
        rows, heads, queries, num_keys, num_block_cols, block_size, stride_block, stride_row, scale,
        c_dim: tl.constexpr, dr: tl.constexpr, bc: tl.constexpr, bdr: tl.constexpr,
        br: tl.constexpr, bt: tl.constexpr, widen: tl.constexpr, ieee: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1) * br + tl.arange(0, br)  # [br] rows: query r // heads, head r % heads
        r_ok = r < rows
        q_pos = tl.load(q_pos_ptr + n * queries + r // heads, mask=r_ok, other=-1)  # [br]
        c = tl.arange(0, bc)
        c_ok = c < c_dim
        d = tl.arange(0, bdr)
        d_ok = d < dr
        q_row = q_ptr + (n * rows + r)[:, None] * (c_dim + dr)  # query rows [q_lat | q_pe], contiguous
        q_lat = tl.load(q_row + c[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)  # [br, bc]
        q_pe = tl.load(q_row + c_dim + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # [br, bdr]
        if widen:  # interpreter, bf16: the same bf16 values as fp32 operands
            q_lat = q_lat.to(tl.float32)
            q_pe = q_pe.to(tl.float32)
        q_dtype = q_ptr.dtype.element_ty
        # not tl.zeros: a jit helper, which breaks the interpreter when triton.language was imported
        # before TRITON_INTERPRET was set (see experts/triton_moe.py)
        m = tl.full((br,), float("-inf"), dtype=tl.float32)
        l_sum = tl.full((br,), 0.0, dtype=tl.float32)
        acc = tl.full((br, bc), 0.0, dtype=tl.float32)
        for t0 in range(0, num_keys, bt):
            j = t0 + tl.arange(0, bt)  # [bt] the item's keys
            j_ok = j < num_keys
            block = tl.load(blocks_ptr + n * num_block_cols + j // block_size, mask=j_ok, other=0).to(
                tl.int64
            )
            key_row = pages_ptr + block * stride_block + (j % block_size).to(tl.int64) * stride_row  # [bt]
            kv = tl.load(key_row[:, None] + c[None, :], mask=j_ok[:, None] & c_ok[None, :], other=0.0)
            k_pe = tl.load(
                key_row[:, None] + c_dim + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0
            )
            kv = kv.to(q_dtype)  # the latent in the query's dtype, as the torch path casts it
            k_pe = k_pe.to(q_dtype)
            if widen:
                kv = kv.to(tl.float32)
                k_pe = k_pe.to(tl.float32)
            if ieee:
                s = tl.dot(q_lat, tl.trans(kv), input_precision="ieee")
                s += tl.dot(q_pe, tl.trans(k_pe), input_precision="ieee")
            else:
                s = tl.dot(q_lat, tl.trans(kv)) + tl.dot(q_pe, tl.trans(k_pe))  # [br, bt] fp32
            k_pos = tl.load(key_pos_ptr + n * num_keys + j, mask=j_ok, other=0)  # [bt]
            seen = (k_pos[None, :] <= q_pos[:, None]) & j_ok[None, :] & r_ok[:, None]
            s = tl.where(seen, s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            base = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen stay all-zero
            alpha = tl.exp(m - base)
            p = tl.exp(s - base[:, None])  # [br, bt]
            l_sum = l_sum * alpha + tl.sum(p, 1)
            p_v = p.to(q_dtype)  # P in the values' dtype for P.V, as the torch path casts it
            if ieee:  # noqa: SIM108 - a constexpr branch: each spelling compiles to its own dot
                pv = tl.dot(p_v.to(tl.float32), kv, input_precision="ieee")
            else:
                pv = tl.dot(p_v, kv)  # bf16 P . bf16 c_kv, fp32 accumulation
            acc = acc * alpha[:, None] + pv
            m = m_new
        seen_any = l_sum > 0
        out = acc / tl.where(seen_any, l_sum, 1.0)[:, None]
        lse = tl.where(seen_any, m + tl.log(tl.where(seen_any, l_sum, 1.0)), float("-inf"))
        o_row = out_ptr + (n * rows + r)[:, None] * c_dim
        tl.store(o_row + c[None, :], out, mask=r_ok[:, None] & c_ok[None, :])
        tl.store(lse_ptr + n * rows + r, lse, mask=r_ok)

    return absorbed_paged


def paged_absorbed(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    q_pos: torch.Tensor,
    pages: torch.Tensor,
    key_blocks: torch.Tensor,
    key_pos: torch.Tensor,
    scale: float,
) -> Partial:
    """q_lat [N, Q, H, C], q_pe [N, Q, H, dr], q_pos [N, Q] long (-1: padding query); pages: one
    layer's latent [num_blocks, block_size, C + dr] (fp32 / bf16, not fp8); key_blocks [N, B] long,
    key_pos [N, B * block_size] long (PAD_KEY_POS for padding). Returns the items' Partial, as
    `attend_absorbed` over `paged_tiles` of the same blocks."""
    n, q, h, c = q_lat.shape
    dr = q_pe.shape[-1]
    if pages.dim() != 3 or pages.shape[-1] != c + dr or pages.dtype in (torch.uint8, torch.int8):
        raise AttentionBackendError(
            f"pages must be a latent [num_blocks, block_size, {c + dr}] in fp32/bf16, got "
            f"{pages.dtype} {tuple(pages.shape)}"
        )
    block_size = pages.shape[1]
    if key_blocks.shape[0] != n or key_pos.shape != (n, key_blocks.shape[1] * block_size):
        raise AttentionBackendError(
            f"key_blocks [{n}, B] and key_pos [{n}, B * {block_size}] expected, got "
            f"{tuple(key_blocks.shape)} and {tuple(key_pos.shape)}"
        )
    if q_pos.shape != (n, q) or q_pe.shape[:3] != (n, q, h):
        raise AttentionBackendError(f"q_pe [{n}, {q}, {h}, dr], q_pos [{n}, {q}] expected")
    out = torch.empty(n, q, h, c, dtype=torch.float32, device=q_lat.device)
    lse = torch.empty(n, q, h, dtype=torch.float32, device=q_lat.device)
    if n == 0 or q * h == 0:
        return Partial(out, lse)
    if pages.stride(2) != 1:
        pages = pages.contiguous()
    query = torch.cat((q_lat, q_pe.to(q_lat.dtype)), dim=-1).contiguous()  # [N, Q, H, C + dr]
    device = q_lat.device  # the step's work items are built on the host: moved once per call
    key_blocks, key_pos, q_pos = (t.to(device).contiguous() for t in (key_blocks, key_pos, q_pos))
    interpret = interpreting()
    widen = interpret and q_lat.dtype != torch.float32
    grid = (n, -(-(q * h) // BLOCK_R))
    _kernel(interpret)[grid](
        query, pages, key_blocks, key_pos, q_pos, out, lse,
        q * h, h, q, key_pos.shape[1], key_blocks.shape[1], block_size, pages.stride(0), pages.stride(1),
        float(scale), c_dim=c, dr=dr, bc=_pow2(c), bdr=_pow2(dr), br=BLOCK_R, bt=BLOCK_T,
        widen=widen, ieee=widen or q_lat.dtype == torch.float32,
    )  # fmt: skip
    return Partial(out, lse)
