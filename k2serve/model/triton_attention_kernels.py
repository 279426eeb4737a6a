"""The Triton kernels of `model/triton_attention.py` (see there for what they compute and why).

A module of its own, imported by `triton_attention._kernels` on first use only: triton reads
TRITON_INTERPRET when a kernel is decorated, so this import must follow the caller's setting; and the
kernels call the helpers below by their module-level names, as triton (and its interpreter) resolves them.
Not tl.zeros anywhere: a jit helper, which breaks the interpreter when triton.language was imported
before TRITON_INTERPRET was set (see experts/triton_moe.py).
"""

# ruff: noqa: ANN001, ANN201, ANN202
# (triton reads its kernels' arguments' annotations itself)

from __future__ import annotations

from k2serve.extras import MissingExtraError

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the base install has no triton: say which extra brings it
    raise MissingExtraError("triton", "gpu", "--attention-backend triton") from e


@triton.jit
def as_operand(x, dtype: tl.constexpr, widen: tl.constexpr):
    """x rounded to the torch path's operand dtype; widened to fp32 under the interpreter (bf16)."""
    x = x.to(dtype)
    if widen:
        x = x.to(tl.float32)
    return x


@triton.jit
def dot(a, b, ieee: tl.constexpr):
    """a . b accumulated in fp32; fp32 operands without TF32."""
    if ieee:  # noqa: SIM108 - a constexpr branch: each spelling compiles to its own dot
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def key_rows(pages_ptr, blocks_ptr, n, num_block_cols, j, j_ok, block_size, stride_block, stride_row):
    """Pool row pointers of the item's keys j: slot j % block_size of block key_blocks[n, j // block_size]."""
    block = tl.load(blocks_ptr + n * num_block_cols + j // block_size, mask=j_ok, other=0).to(tl.int64)
    return pages_ptr + block * stride_block + (j % block_size).to(tl.int64) * stride_row


@triton.jit
def softmax_step(s, seen, scale, m, l_sum):
    """One tile of the online softmax: s [rows, bt] raw scores, `seen` the keys each row may see.
    Returns p, the rescale alpha of what was accumulated, the new max and sum (torch's -inf rules:
    a row with nothing seen stays all-zero)."""
    s = tl.where(seen, s * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - base)
    p = tl.exp(s - base[:, None])
    return p, alpha, m_new, l_sum * alpha + tl.sum(p, 1)


@triton.jit
def finish(acc, m, l_sum):
    """The normalised output and the log-sum-exp (-inf, out 0 where no key was seen)."""
    seen_any = l_sum > 0
    out = acc / tl.where(seen_any, l_sum, 1.0)[:, None]
    lse = tl.where(seen_any, m + tl.log(tl.where(seen_any, l_sum, 1.0)), float("-inf"))
    return out, lse


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
    q_dtype = q_ptr.dtype.element_ty
    q_row = q_ptr + (n * rows + r)[:, None] * (c_dim + dr)  # query rows [q_lat | q_pe], contiguous
    q_lat = tl.load(q_row + c[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)  # [br, bc]
    q_pe = tl.load(q_row + c_dim + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # [br, bdr]
    q_lat = as_operand(q_lat, q_dtype, widen)
    q_pe = as_operand(q_pe, q_dtype, widen)
    m = tl.full((br,), float("-inf"), dtype=tl.float32)
    l_sum = tl.full((br,), 0.0, dtype=tl.float32)
    acc = tl.full((br, bc), 0.0, dtype=tl.float32)
    for t0 in range(0, num_keys, bt):
        j = t0 + tl.arange(0, bt)  # [bt] the item's keys
        j_ok = j < num_keys
        key_row = key_rows(
            pages_ptr, blocks_ptr, n, num_block_cols, j, j_ok, block_size, stride_block, stride_row
        )
        kv = tl.load(key_row[:, None] + c[None, :], mask=j_ok[:, None] & c_ok[None, :], other=0.0)
        k_pe = tl.load(key_row[:, None] + c_dim + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        kv = as_operand(kv, q_dtype, widen)  # the latent in the query's dtype, as the torch path casts it
        k_pe = as_operand(k_pe, q_dtype, widen)
        s = dot(q_lat, tl.trans(kv), ieee) + dot(q_pe, tl.trans(k_pe), ieee)  # [br, bt] fp32
        k_pos = tl.load(key_pos_ptr + n * num_keys + j, mask=j_ok, other=0)  # [bt]
        seen = (k_pos[None, :] <= q_pos[:, None]) & j_ok[None, :] & r_ok[:, None]
        p, alpha, m, l_sum = softmax_step(s, seen, scale, m, l_sum)
        # P in the values' dtype for P.V, as the torch path casts it; fp32 accumulation
        acc = acc * alpha[:, None] + dot(as_operand(p, q_dtype, widen), kv, ieee)
    out, lse = finish(acc, m, l_sum)
    o_row = out_ptr + (n * rows + r)[:, None] * c_dim
    tl.store(o_row + c[None, :], out, mask=r_ok[:, None] & c_ok[None, :])
    tl.store(lse_ptr + n * rows + r, lse, mask=r_ok)


@triton.jit
def expanded_paged(
    qn_ptr, qpe_ptr, w_ptr, pages_ptr, blocks_ptr, key_pos_ptr, q_pos_ptr, out_ptr, lse_ptr,
    heads, queries, num_keys, num_block_cols, block_size, stride_block, stride_row, scale,
    c_dim: tl.constexpr, dn: tl.constexpr, dv: tl.constexpr, dr: tl.constexpr, bck: tl.constexpr,
    bdn: tl.constexpr, bdv: tl.constexpr, bdr: tl.constexpr, bq: tl.constexpr, bt: tl.constexpr,
    widen: tl.constexpr, ieee: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    qs = tl.program_id(2) * bq + tl.arange(0, bq)  # [bq] the item's queries, head h
    q_ok = qs < queries
    q_pos = tl.load(q_pos_ptr + n * queries + qs, mask=q_ok, other=-1)
    row = (n * queries + qs) * heads + h  # [bq] rows of [N, Q, H]
    e = tl.arange(0, bdn)
    e_ok = e < dn
    f = tl.arange(0, bdv)
    f_ok = f < dv
    d = tl.arange(0, bdr)
    d_ok = d < dr
    q_dtype = qn_ptr.dtype.element_ty
    q_nope = tl.load(qn_ptr + row[:, None] * dn + e[None, :], mask=q_ok[:, None] & e_ok[None, :], other=0.0)
    q_pe = tl.load(qpe_ptr + row[:, None] * dr + d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    q_nope = as_operand(q_nope, q_dtype, widen)
    q_pe = as_operand(q_pe, q_dtype, widen)
    w_k = w_ptr + (h * (dn + dv) + e).to(tl.int64)[:, None] * c_dim  # head h's W_UK rows [bdn]
    w_v = w_ptr + (h * (dn + dv) + dn + f).to(tl.int64)[:, None] * c_dim  # and W_UV rows [bdv]
    m = tl.full((bq,), float("-inf"), dtype=tl.float32)
    l_sum = tl.full((bq,), 0.0, dtype=tl.float32)
    acc = tl.full((bq, bdv), 0.0, dtype=tl.float32)
    for t0 in range(0, num_keys, bt):
        j = t0 + tl.arange(0, bt)
        j_ok = j < num_keys
        key_row = key_rows(
            pages_ptr, blocks_ptr, n, num_block_cols, j, j_ok, block_size, stride_block, stride_row
        )
        # the tile expanded for head h: k_nope = c_kv . W_UK^T, v = c_kv . W_UV^T, over chunks of C
        k_nope = tl.full((bt, bdn), 0.0, dtype=tl.float32)
        v = tl.full((bt, bdv), 0.0, dtype=tl.float32)
        for c0 in range(0, c_dim, bck):
            cc = c0 + tl.arange(0, bck)
            cc_ok = cc < c_dim
            kv = tl.load(key_row[:, None] + cc[None, :], mask=j_ok[:, None] & cc_ok[None, :], other=0.0)
            kv = as_operand(kv, q_dtype, widen)
            wk = tl.load(w_k + cc[None, :], mask=e_ok[:, None] & cc_ok[None, :], other=0.0)
            wv = tl.load(w_v + cc[None, :], mask=f_ok[:, None] & cc_ok[None, :], other=0.0)
            k_nope += dot(kv, tl.trans(as_operand(wk, q_dtype, widen)), ieee)
            v += dot(kv, tl.trans(as_operand(wv, q_dtype, widen)), ieee)
        k_pe = tl.load(key_row[:, None] + c_dim + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        k_nope = as_operand(k_nope, q_dtype, widen)  # the torch path's GEMM output dtype
        v = as_operand(v, q_dtype, widen)
        s = dot(q_nope, tl.trans(k_nope), ieee) + dot(q_pe, tl.trans(as_operand(k_pe, q_dtype, widen)), ieee)
        k_pos = tl.load(key_pos_ptr + n * num_keys + j, mask=j_ok, other=0)
        seen = (k_pos[None, :] <= q_pos[:, None]) & j_ok[None, :] & q_ok[:, None]
        p, alpha, m, l_sum = softmax_step(s, seen, scale, m, l_sum)
        acc = acc * alpha[:, None] + dot(as_operand(p, q_dtype, widen), v, ieee)
    out, lse = finish(acc, m, l_sum)
    tl.store(out_ptr + row[:, None] * dv + f[None, :], out, mask=q_ok[:, None] & f_ok[None, :])
    tl.store(lse_ptr + row, lse, mask=q_ok)
