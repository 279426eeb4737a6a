"""Weight formats: compressed-tensors pack-quantized INT4 and FP8 e4m3 with block scales.

INT4 (symmetric, group along the input dim): `weight_packed` int32 [out, in/8] holds eight 4-bit
values per word, value j at bits 4j..4j+3, stored as q + 8; `weight_scale` [out, in/group];
W[o, g*group:(g+1)*group] = q * weight_scale[o, g]. Kimi's grid uses q in [-7, 7].

INT4 in torch's CPU tiles (what `aten._convert_weight_to_int4pack_for_cpu` makes for the fused
`aten._weight_int4pack_mm_for_cpu`): uint8 [out, in/2] holding the same unsigned nibbles q + 8,
rearranged into tiles whose shape depends on the CPU capability torch dispatches to (see
`Int4CpuTiles`); scales sit in a separate [in/group, out, 2] tensor (scale, zero).

FP8: e4m3 weight [out, in] with `weight_scale_inv` float32 [ceil(out/128), ceil(in/128)];
W = weight.float() * scale_inv broadcast over 128x128 blocks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

_NIBBLE_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # [8]


def quantize_int4(
    weight: torch.Tensor, group_size: int = 32, qmax: int = 7
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-group quantisation: returns (q int8 in [-qmax, qmax] [out, in], scale fp32 [out, in/group])."""
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ValueError(f"input dim {in_f} is not a multiple of the group size {group_size}")
    w = weight.float().reshape(out_f, in_f // group_size, group_size)
    scale = w.abs().amax(dim=-1) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w / scale[..., None]), -qmax, qmax).to(torch.int8)
    return q.reshape(out_f, in_f), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [out, in] -> int32 [out, in/8] (value j of a word at bits 4j..4j+3, as q+8)."""
    out_f, in_f = q.shape
    if in_f % 8:
        raise ValueError(f"input dim {in_f} is not a multiple of 8")
    if int(q.min()) < -8 or int(q.max()) > 7:
        raise ValueError("int4 values must lie in [-8, 7]")
    u = (q.to(torch.int64) + 8).reshape(out_f, in_f // 8, 8)
    words = torch.sum(u << _NIBBLE_SHIFTS.to(torch.int64), dim=-1)  # [out, in/8] in [0, 2**32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., out, in/8] -> int8 [..., out, in] in [-8, 7]."""
    shifts = _NIBBLE_SHIFTS.to(packed.device)
    u = (packed.unsqueeze(-1) >> shifts) & 0xF  # [..., in/8, 8]
    return (u.to(torch.int8) - 8).flatten(-2)


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[..., out, in/8] int32 and [..., out, in/group] scales -> dense weight [..., out, in] in `dtype`."""
    q = unpack_int4(packed)
    group = q.shape[-1] // scale.shape[-1]
    w = q.to(dtype).unflatten(-1, (scale.shape[-1], group)) * scale.to(dtype).unsqueeze(-1)
    return w.flatten(-2)


@dataclass(frozen=True)
class Int4CpuTiles:
    """Where torch's CPU int4 packing puts each weight of an [out, in] matrix.

    The out rows come in blocks of `block`; for each block and input column, block/2 bytes hold the
    block's rows, the low nibbles of those bytes first and then the high nibbles. `rows` is None when
    that order is the rows' own (AVX512: blocks of 64, byte j = rows j and j + 32; AVX2: blocks of
    32, rows j and j + 16), else the gather index that puts them back in order (torch's default
    capability pairs rows 2j, 2j + 1 in byte j).
    """

    block: int
    rows: torch.Tensor | None


@functools.cache
def int4pack_cpu_tiles(out_f: int, in_f: int) -> Int4CpuTiles | None:
    """The tile layout this torch uses for an [out_f, in_f] weight, or None if it is not of the form
    `Int4CpuTiles` describes (e.g. a partial last block laid out differently from the others).

    Found by packing probe matrices whose 4-bit values spell each weight's flat position, one hex
    digit per probe, and reading back where every position landed: the layout is measured on the
    machine and torch build at hand (it follows the CPU capability torch dispatches to) instead of
    assumed, and a layout this function does not recognise gives None, never wrong weights. Costs a
    few int64 copies of the matrix, once per shape.
    """
    n_weights = out_f * in_f
    cpu = torch.device("cpu")  # explicit: whatever default device the caller has set
    position = torch.arange(n_weights, dtype=torch.int64, device=cpu)
    landed = torch.zeros(n_weights // 2, 2, dtype=torch.int64, device=cpu)  # per byte: (low, high) nibble
    for shift in range(0, max(n_weights - 1, 1).bit_length(), 4):
        digit = ((position >> shift) & 15).to(torch.int32).view(out_f, in_f)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 2).flatten().to(torch.int64)
        landed |= torch.stack((packed & 15, packed >> 4), dim=-1) << shift
    row, col = landed // in_f, landed % in_f
    leaves_col0 = (col[:, 0] != 0).nonzero()
    half = int(leaves_col0[0]) if len(leaves_col0) else out_f // 2  # bytes per block and column
    if half == 0 or out_f % (2 * half):
        return None
    block = 2 * half
    shape = (out_f // block, in_f, half)
    col_expected = torch.arange(in_f, device=cpu).view(1, in_f, 1).expand(shape)
    if not all(torch.equal(col[:, h].view(shape), col_expected) for h in (0, 1)):
        return None
    rows = torch.cat((row[:, 0].view(shape), row[:, 1].view(shape)), dim=-1)  # [blocks, in, block]
    order = rows[0, 0]  # row within the block held by each nibble slot
    first_row = torch.arange(0, out_f, block, device=cpu).view(-1, 1, 1)
    if not torch.equal(rows, (first_row + order).expand_as(rows)):
        return None
    if torch.equal(order, torch.arange(block, device=cpu)):
        return Int4CpuTiles(block, None)
    return Int4CpuTiles(block, torch.argsort(order))


@torch.no_grad()
def pack_int4_cpu_into(
    packed: torch.Tensor, scale: torch.Tensor, tiles: torch.Tensor, sz: torch.Tensor
) -> None:
    """Write the compressed-tensors form (packed int32 [out, in/8], scale [out, in/group]) into torch's
    CPU int4 tiles: tiles uint8 [out, in/2] and sz [in/group, out, 2] (scale, zero = 0), in place."""
    u = (unpack_int4(packed).to(torch.int32) + 8).contiguous()  # [out, in] in [0, 16)
    tiles.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 2))
    sz[..., 0] = scale.t()
    sz[..., 1] = 0


def dequantize_int4pack_cpu(
    packed: torch.Tensor, scale: torch.Tensor, tiles: Int4CpuTiles, dtype: torch.dtype
) -> torch.Tensor:
    """Torch CPU int4 tiles uint8 [out, in/2] and scales [in/group, out] -> the dense weight, transposed:
    [in, out] in `dtype` (`F.linear(x, w.t())` reads it as is).

    W = (q - 8) * scale. The fused kernel forms the same product in fp32 (plus a zero point, which
    symmetric INT4 leaves at 0 and this function does not read), so fp32 weights are bitwise the
    kernel's; in bf16 the product is rounded to bf16, as a bf16 dense model's weight would be. The
    [in, out] orientation makes the unpacking a strided copy per nibble half instead of a transpose.
    """
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    block, half = tiles.block, tiles.block // 2
    group = in_f // scale.shape[0]
    tile_bytes = packed.view(out_f // block, in_f, half).transpose(0, 1)  # [in, blocks, block/2]
    w = torch.empty(in_f, out_f // block, 2, half, dtype=dtype, device=packed.device)
    w[:, :, 0] = (tile_bytes & 15).view(torch.int8) - 8
    w[:, :, 1] = (tile_bytes >> 4).view(torch.int8) - 8
    if tiles.rows is not None:
        w = w.view(in_f, out_f // block, block)[..., tiles.rows]
    w = w.view(in_f // group, group, out_f).mul_(scale.contiguous().unsqueeze(1))  # strided: 4x slower
    return w.view(in_f, out_f)


def quantize_fp8_block(
    weight: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [out, in] -> (e4m3 weight [out, in], float32 scale_inv [ceil(out/b0), ceil(in/b1)])."""
    out_f, in_f = weight.shape
    b0, b1 = block
    n0, n1 = -(-out_f // b0), -(-in_f // b1)
    padded = torch.zeros(n0 * b0, n1 * b1, dtype=torch.float32)
    padded[:out_f, :in_f] = weight.float()
    blocks = padded.reshape(n0, b0, n1, b1)
    amax = blocks.abs().amax(dim=(1, 3))
    fmax = torch.finfo(torch.float8_e4m3fn).max
    scale_inv = torch.where(amax == 0, torch.ones_like(amax), amax / fmax)
    q = (blocks / scale_inv[:, None, :, None]).reshape(n0 * b0, n1 * b1)[:out_f, :in_f]
    return q.to(torch.float8_e4m3fn), scale_inv


def dequantize_fp8_block(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `quantize_fp8_block` up to e4m3 rounding: weight * scale_inv per block."""
    out_f, in_f = weight.shape
    b0, b1 = block
    s = scale_inv.float().repeat_interleave(b0, dim=0)[:out_f].repeat_interleave(b1, dim=1)[:, :in_f]
    return (weight.float() * s).to(dtype)
