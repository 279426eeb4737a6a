"""The FP8 latent cache format: what one token's MLA latent of one layer looks like in the pool.

The layout is vLLM's / FlashMLA's `fp8_ds_mla` row (656 bytes for K2, kv_lora_rank 512, rope 64):

    bytes [0, C)                 the C normalised c_kv values in float8_e4m3fn, divided by the scale
    bytes [C, C + scale_bytes)   fp32 scales, one slot per 128 values of c_kv (4 for K2: 16 bytes)
    bytes [C + scale_bytes, end) the dr rotated k_pe values in bfloat16, not quantised (RoPE keys are
                                 the part fp8 hurts most, so vLLM keeps them at 16 bits)

We quantise with one scale per token per layer, `amax(|c_kv|) / 448` (448 is e4m3fn's largest
finite value), and write it into every scale slot, so a reader of vLLM's per-128 layout reads the
same numbers. scale_bytes is 4 * ceil(C / 128) rounded up to 16 (rows stay 16-byte aligned).
Round-trip error of a c_kv value x (scale s = amax / 448): |x - x'| <= max(|x| * 2^-4, s * 2^-10)
(e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 of the value in the normal range, and the
subnormal step below 2^-6 is 2^-9); so always <= amax * 2^-4. k_pe keeps bf16's relative error
2^-9. Both bounds are tested in tests/test_kv_fp8.py.

The cache dtypes a pool can hold: "auto" (the model's dtype), "bf16", "fp32", "fp8" (this format).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["CACHE_DTYPES", "FP8_MAX", "Fp8Layout", "resolve_cache_dtype"]

CACHE_DTYPES = ("auto", "bf16", "fp32", "fp8")
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_SCALE_GROUP = 128  # values of c_kv per scale slot in vLLM's fp8_ds_mla layout


def resolve_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype | None:
    """The torch dtype a pool of cache dtype `name` stores values in, None for "fp8" (raw rows)."""
    if name not in CACHE_DTYPES:
        raise ValueError(f"kv cache dtype {name!r} is not one of {', '.join(CACHE_DTYPES)}")
    return {"auto": model_dtype, "bf16": torch.bfloat16, "fp32": torch.float32, "fp8": None}[name]


@dataclass(frozen=True)
class Fp8Layout:
    """The fp8 row of a latent of `kv_rank` c_kv values and `rope_dim` k_pe values."""

    kv_rank: int
    rope_dim: int

    def __post_init__(self) -> None:
        if self.kv_rank < 1 or self.rope_dim < 0 or self.kv_rank % 4:
            raise ValueError(
                f"fp8 latent needs kv_rank a positive multiple of 4 and rope_dim >= 0, got "
                f"{self.kv_rank} and {self.rope_dim}"
            )

    @property
    def kv_dim(self) -> int:
        """Values of the latent (C + dr)."""
        return self.kv_rank + self.rope_dim

    @property
    def scale_slots(self) -> int:
        return math.ceil(self.kv_rank / _SCALE_GROUP)

    @property
    def scale_bytes(self) -> int:
        return -(-4 * self.scale_slots // 16) * 16

    @property
    def rope_offset(self) -> int:
        return self.kv_rank + self.scale_bytes

    @property
    def row_bytes(self) -> int:
        """Bytes of one token of one layer (656 for K2)."""
        return self.rope_offset + 2 * self.rope_dim

    def quantize(self, values: torch.Tensor) -> torch.Tensor:
        """values [T, C + dr] (any float dtype) -> rows uint8 [T, row_bytes]."""
        if values.dim() != 2 or values.shape[1] != self.kv_dim:
            raise ValueError(f"latent of shape {tuple(values.shape)} is not [T, {self.kv_dim}]")
        t, c = values.shape[0], self.kv_rank
        x = values.float()
        c_kv, k_pe = x[:, :c], x[:, c:]
        amax = c_kv.abs().amax(-1, keepdim=True)  # [T, 1]
        scale = torch.where(amax > 0, amax / FP8_MAX, 1.0)  # [T, 1] fp32
        q = (c_kv / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        rows = torch.zeros(t, self.row_bytes, dtype=torch.uint8, device=values.device)
        rows[:, :c] = q.view(torch.uint8)
        scales = scale.expand(t, self.scale_bytes // 4).contiguous()
        rows[:, c : self.rope_offset] = scales.view(torch.uint8)
        rows[:, self.rope_offset :] = k_pe.to(torch.bfloat16).contiguous().view(torch.uint8)
        return rows

    def dequantize(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """rows uint8 [..., row_bytes] -> latent [..., C + dr] in `dtype` (c_kv * scale, k_pe)."""
        if rows.dtype != torch.uint8 or rows.shape[-1] != self.row_bytes:
            raise ValueError(
                f"fp8 rows must be uint8 [..., {self.row_bytes}], got {rows.dtype} {tuple(rows.shape)}"
            )
        c = self.kv_rank
        # Views of the raw bytes, no copies (each field's byte offset and the row's 656 bytes are
        # multiples of its element size); the result is written field by field, not concatenated.
        q = rows[..., :c].view(torch.float8_e4m3fn)  # [..., C]
        scale = rows[..., c : c + 4].view(torch.float32)  # [..., 1]
        k_pe = rows[..., self.rope_offset :].view(torch.bfloat16)  # [..., dr]
        out = torch.empty(*rows.shape[:-1], c + self.rope_dim, dtype=dtype, device=rows.device)
        if dtype == torch.float32:
            torch.mul(q.float(), scale, out=out[..., :c])
        else:
            out[..., :c] = q.float() * scale
        out[..., c:] = k_pe
        return out
