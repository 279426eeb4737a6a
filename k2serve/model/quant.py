"""Weight formats: compressed-tensors pack-quantized INT4 and FP8 e4m3 with block scales.

INT4 (symmetric, group along the input dim): `weight_packed` int32 [out, in/8] holds eight 4-bit
values per word, value j at bits 4j..4j+3, stored as q + 8; `weight_scale` [out, in/group];
W[o, g*group:(g+1)*group] = q * weight_scale[o, g]. Kimi's grid uses q in [-7, 7].

FP8: e4m3 weight [out, in] with `weight_scale_inv` float32 [ceil(out/128), ceil(in/128)];
W = weight.float() * scale_inv broadcast over 128x128 blocks.
"""

from __future__ import annotations

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
