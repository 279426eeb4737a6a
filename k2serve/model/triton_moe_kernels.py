"""The Triton kernel of `model/triton_moe.py` (see there for what it computes and why).

A module of its own, imported by `triton_moe._kernel` on first use only: triton reads TRITON_INTERPRET
when a kernel is decorated, so this import must follow the caller's setting; and the kernel calls the
helpers below (and `triton_attention_kernels.as_operand` / `dot`) by their module-level names, as triton
and its interpreter resolve them. Not tl.zeros: see triton_attention_kernels.
"""

# ruff: noqa: ANN001, ANN201, ANN202
# (triton reads its kernels' arguments' annotations itself)

from __future__ import annotations

from k2serve.extras import MissingExtraError

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the base install has no triton: say which extra brings it
    raise MissingExtraError("triton", "gpu", "--moe-backend triton") from e

from k2serve.model.triton_attention_kernels import as_operand, dot


@triton.jit
def fused_moe(
    a_ptr, w_ptr, scale_ptr, out_ptr, route_ptr, sorted_ids_ptr, block_expert_ptr, n_padded_ptr,
    n_rows, n_out, k_dim, stride_we, stride_wr, stride_se, stride_sr, a_div,
    group: tl.constexpr, pair: tl.constexpr, weighted: tl.constexpr, int4: tl.constexpr,
    widen: tl.constexpr, ieee: tl.constexpr, bm: tl.constexpr, bn: tl.constexpr, bk: tl.constexpr,
):  # fmt: skip
    """out[id, cols] = act(A[id // a_div] @ W_e^T) (* route[id]) for the row ids of M block
    program_id(0) (expert e = block_expert[block]) and output columns program_id(1).
    pair 2 (SwiGLU): W_e holds gate rows then up rows (n_out each); the weight tile interleaves gate and up
    rows of the same columns (2 * bn rows: one load, one dot per K step) and act = silu(gate) * up
    from the fp32 accumulators; pair 1: act is the identity. INT4 weights: the packed words and scales
    are read and dequantised in registers, (q - 8) * scale in fp32 rounded to A's dtype as the torch
    path rounds. Padding ids (>= n_rows) load zeros and store nothing; blocks past n_padded return."""
    pid_m = tl.program_id(0)
    if pid_m * bm >= tl.load(n_padded_ptr):
        return
    ids = tl.load(sorted_ids_ptr + pid_m * bm + tl.arange(0, bm))  # [bm] int32
    row_ok = ids < n_rows
    a_rows = (ids // a_div).to(tl.int64)  # int64: rows * K may pass 2**31
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    r = tl.arange(0, bn * pair)  # weight tile rows: column r // pair, gate (r % 2 = 0) or up (1)
    cols = tl.program_id(1) * bn + r // pair
    w_rows = cols + (r % pair) * n_out  # [bn * pair] rows of W_e
    col_ok = cols < n_out
    acc = tl.full((bm, bn * pair), 0.0, dtype=tl.float32)
    a_base = a_ptr + a_rows[:, None] * k_dim  # [bm, 1] row pointers, hoisted out of the K loop
    w_base = w_ptr + e * stride_we + w_rows[:, None] * stride_wr
    s_base = scale_ptr + e * stride_se + w_rows[:, None] * stride_sr
    for k0 in range(0, k_dim, bk):
        ks = k0 + tl.arange(0, bk)  # [bk]
        k_ok = ks[None, :] < k_dim
        a = tl.load(a_base + ks[None, :], mask=row_ok[:, None] & k_ok, other=0.0)
        w_mask = col_ok[:, None] & k_ok
        if int4:
            words = tl.load(w_base + (ks // 8)[None, :], mask=w_mask, other=0)  # [bn * pair, bk] int32,
            # each word read for its 8 values
            q = ((words >> ((ks % 8) * 4)[None, :]) & 0xF) - 8
            w = q.to(tl.float32) * tl.load(s_base + (ks // group)[None, :], mask=w_mask, other=0.0).to(
                tl.float32
            )
        else:  # dense [E, O, K]: read as it is
            w = tl.load(w_base + ks[None, :], mask=w_mask, other=0.0)
        acc += dot(as_operand(a, a.dtype, widen), tl.trans(as_operand(w, a.dtype, widen)), ieee)
    if pair == 2:
        gate, up = tl.split(tl.reshape(acc, (bm, bn, 2)))
        z = tl.exp(-tl.abs(gate))  # silu without overflow: sigmoid from exp(-|g|) in (0, 1]
        acc = gate * tl.where(gate >= 0, 1.0 / (1.0 + z), z / (1.0 + z)) * up
    if weighted:
        acc = acc * tl.load(route_ptr + ids, mask=row_ok, other=0.0)[:, None]
    out_cols = tl.program_id(1) * bn + tl.arange(0, bn)
    out = out_ptr + ids.to(tl.int64)[:, None] * n_out + out_cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (out_cols < n_out)[None, :])
