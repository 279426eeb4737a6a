"""Paged MLA attention over the latent as Triton kernels: `attend_absorbed` and `attend_expanded` on the GPU.

`paged_absorbed(q_lat, q_pe, q_pos, pages, key_blocks, key_pos, scale)` computes what
`attend_absorbed(q_lat, q_pe, q_pos, paged_tiles(pages, key_blocks, key_pos, ...), scale)` does, and
`paged_expanded(q_nope, q_pe, q_pos, pages, key_blocks, key_pos, kv_b_weight, v_dim, scale)` what
`attend_expanded` does over the same tiles (the contract of `model/attention.py`): N work items, item
n its Q query rows over the keys its blocks hold; both return the same `Partial` (out normalised,
lse, fp32), so split-K items are merged by the existing `merge_partials`.

Both read an item's keys BLOCK_T at a time straight from the pool through `key_blocks` (key j of the
item is slot j % block_size of block key_blocks[n, j // block_size]: no gathered copy, any block size),
mask keys by position (key_pos > q_pos; padding keys carry PAD_KEY_POS, padding queries -1) and keep
an online softmax (running max, sum, fp32 accumulator) with the torch path's -inf conventions: a row
that sees no key gets out 0, lse -inf. Dims are padded to powers of two (at least 16, tl.dot's
minimum) with masks; K2's 512 + 64 latent and 128 + 64 / 128 heads are powers of two already.
- absorbed (decode splits, in-place runs, absorbed prefill chunks): one program per (item, BLOCK_R
  (query, head) rows), so a decode item's rows are its heads per rank; scores [q_lat | q_pe] .
  [c_kv | k_pe], values c_kv, out [N, Q, H, C].
- expanded (prefill chunks over a short context): one program per (item, head, BLOCK_R queries);
  each key tile is expanded for the head in registers (k_nope, v = c_kv . W^T, over 64-wide chunks of
  C), so no expanded K/V is ever written; out [N, Q, H, dv].

Precision mirrors the torch path: the latent (and W) in the query's dtype, the expanded k_nope / v and
P rounded to it before their products, every product accumulated in fp32. fp32 operands use tl.dot
without TF32 (`input_precision="ieee"`); bf16 operands use tl.dot on bf16 natively on GPU. Under
TRITON_INTERPRET=1 bf16 operands are widened to fp32 before tl.dot, as `experts/triton_moe.py` does
(the interpreter's dot mishandles bf16: checked with triton 3.9, it returns garbage): the same bf16
values, so results match up to summation order. The bf16 tl.dot path itself therefore only runs on a
GPU. The torch path rounds bf16 scores (its GEMM output) before the softmax, the kernels keep them in
fp32: bf16 results agree to ~1e-2 relative. An fp8 pool (raw rows with scales) is not read by these
kernels: the engine keeps the torch path for it. Block sizes (16 rows x 16 keys) are the ones the
interpreter tests; tuning for a GPU (and checking register use at C = 512) is open: no GPU was available.

Triton is imported lazily and the kernels built on first use (`triton_attention_kernels`), so
TRITON_INTERPRET set before that takes effect. `check_backend` tells a caller up front whether the
kernels can run on a device.
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


def triton_refusal(what: str, flag: str, device: torch.device) -> str | None:
    """Why a Triton kernel (`what`, chosen by `flag`) cannot run on tensors on `device`: triton not
    importable, or CPU tensors without TRITON_INTERPRET=1; None when it can. Shared by the attention
    and MoE backends."""
    if importlib.util.find_spec("triton") is None:
        return (
            f"{what} 'triton' needs the triton package (pip install triton) and CUDA tensors, "
            "or TRITON_INTERPRET=1 on CPU"
        )
    if device.type != "cuda" and not interpreting():
        return (
            f"{what} 'triton' needs CUDA or TRITON_INTERPRET=1: the model is on {device.type}; "
            f"set TRITON_INTERPRET=1 to run the kernel in the (slow) interpreter, or use {flag} torch"
        )
    return None


def check_backend(backend: str, device: torch.device) -> None:
    """Raise AttentionBackendError when `backend` cannot run on tensors on `device`: an unknown name,
    triton not importable, or CPU tensors without TRITON_INTERPRET=1 (the kernel needs CUDA)."""
    if backend not in ATTENTION_BACKENDS:
        raise AttentionBackendError(
            f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}"
        )
    reason = (
        None if backend == "torch" else triton_refusal("attention backend", "--attention-backend", device)
    )
    if reason is not None:
        raise AttentionBackendError(reason)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (n - 1).bit_length())


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any]:  # triton JITFunctions: kernel[grid](...)
    """The kernels (absorbed, expanded), imported on first use: triton decides whether to interpret
    when it decorates them, so TRITON_INTERPRET must be set before (the module is imported once)."""
    del interpret  # part of the cache key only
    from k2serve.model import triton_attention_kernels as k

    return k.absorbed_paged, k.expanded_paged


def _check_keys(
    pages: torch.Tensor,
    width: int,
    n: int,
    key_blocks: torch.Tensor,
    key_pos: torch.Tensor,
    q_pos: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Validate the items' key addressing; returns pages (rows contiguous), key_blocks, key_pos and
    q_pos on the pages' device (the step's work items are built on the host: moved once per call)."""
    if pages.dim() != 3 or pages.shape[-1] != width or pages.dtype in (torch.uint8, torch.int8):
        raise AttentionBackendError(
            f"pages must be a latent [num_blocks, block_size, {width}] in fp32/bf16, got "
            f"{pages.dtype} {tuple(pages.shape)}"
        )
    block_size = pages.shape[1]
    if key_blocks.shape[0] != n or key_pos.shape != (n, key_blocks.shape[1] * block_size):
        raise AttentionBackendError(
            f"key_blocks [{n}, B] and key_pos [{n}, B * {block_size}] expected, got "
            f"{tuple(key_blocks.shape)} and {tuple(key_pos.shape)}"
        )
    if q_pos.dim() != 2 or q_pos.shape[0] != n:
        raise AttentionBackendError(f"q_pos [{n}, Q] expected, got {tuple(q_pos.shape)}")
    if pages.stride(2) != 1:
        pages = pages.contiguous()
    device = pages.device
    return pages, *(t.to(device).contiguous() for t in (key_blocks, key_pos, q_pos))


def _paging_args(pages: torch.Tensor, key_blocks: torch.Tensor, key_pos: torch.Tensor) -> tuple[int, ...]:
    """num_keys, num_block_cols, block_size, stride_block, stride_row: how the kernels find a key."""
    return key_pos.shape[1], key_blocks.shape[1], pages.shape[1], pages.stride(0), pages.stride(1)


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
    `attend_absorbed` over `paged_tiles` of the same blocks (out [N, Q, H, C])."""
    n, q, h, c = q_lat.shape
    dr = q_pe.shape[-1]
    if q_pe.shape[:3] != (n, q, h):
        raise AttentionBackendError(f"q_pe [{n}, {q}, {h}, dr] expected, got {tuple(q_pe.shape)}")
    pages, key_blocks, key_pos, q_pos = _check_keys(pages, c + dr, n, key_blocks, key_pos, q_pos)
    out = torch.empty(n, q, h, c, dtype=torch.float32, device=q_lat.device)
    lse = torch.empty(n, q, h, dtype=torch.float32, device=q_lat.device)
    if n == 0 or q * h == 0:
        return Partial(out, lse)
    query = torch.cat((q_lat, q_pe.to(q_lat.dtype)), dim=-1).contiguous()  # [N, Q, H, C + dr]
    interpret = interpreting()
    widen = interpret and q_lat.dtype != torch.float32
    grid = (n, -(-(q * h) // BLOCK_R))
    _kernels(interpret)[0][grid](
        query, pages, key_blocks, key_pos, q_pos, out, lse, q * h, h, q,
        *_paging_args(pages, key_blocks, key_pos), float(scale),
        c_dim=c, dr=dr, bc=_pow2(c), bdr=_pow2(dr), br=BLOCK_R, bt=BLOCK_T,
        widen=widen, ieee=widen or q_lat.dtype == torch.float32,
    )  # fmt: skip
    return Partial(out, lse)


def paged_expanded(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    q_pos: torch.Tensor,
    pages: torch.Tensor,
    key_blocks: torch.Tensor,
    key_pos: torch.Tensor,
    kv_b_weight: torch.Tensor,
    v_dim: int,
    scale: float,
) -> Partial:
    """q_nope [N, Q, H, dn], q_pe [N, Q, H, dr], q_pos [N, Q]; kv_b_weight [H * (dn + dv), C]; keys
    as in `paged_absorbed`. One program per (item, head, 16 queries) expands each key tile for its
    head in registers (k_nope, v = c_kv . W^T over 64-wide chunks of C: K2's 128 + 64 / 128 heads),
    so no expanded K/V is written. Returns the Partial of `attend_expanded` (out [N, Q, H, dv])."""
    n, q, h, dn = q_nope.shape
    dr = q_pe.shape[-1]
    c = kv_b_weight.shape[1]
    if q_pe.shape[:3] != (n, q, h) or kv_b_weight.shape[0] != h * (dn + v_dim):
        raise AttentionBackendError(
            f"q_pe [{n}, {q}, {h}, dr] and kv_b_weight [{h} * ({dn} + {v_dim}), C] expected, got "
            f"{tuple(q_pe.shape)} and {tuple(kv_b_weight.shape)}"
        )
    pages, key_blocks, key_pos, q_pos = _check_keys(pages, c + dr, n, key_blocks, key_pos, q_pos)
    out = torch.empty(n, q, h, v_dim, dtype=torch.float32, device=q_nope.device)
    lse = torch.empty(n, q, h, dtype=torch.float32, device=q_nope.device)
    if n == 0 or q * h == 0:
        return Partial(out, lse)
    dtype = q_nope.dtype
    interpret = interpreting()
    widen = interpret and dtype != torch.float32
    grid = (n, h, -(-q // BLOCK_R))
    _kernels(interpret)[1][grid](
        q_nope.contiguous(), q_pe.to(dtype).contiguous(), kv_b_weight.to(dtype).contiguous(), pages,
        key_blocks, key_pos, q_pos, out, lse, h, q, *_paging_args(pages, key_blocks, key_pos), float(scale),
        c_dim=c, dn=dn, dv=v_dim, dr=dr, bck=min(64, _pow2(c)), bdn=_pow2(dn), bdv=_pow2(v_dim),
        bdr=_pow2(dr), bq=BLOCK_R, bt=BLOCK_T, widen=widen, ieee=widen or dtype == torch.float32,
    )  # fmt: skip
    return Partial(out, lse)
