"""INT4 weight-only linear layers on the CPU: a pack-quantized dense layer kept in 4 bits.

K2's own checkpoints quantise only the routed experts; a checkpoint may also store the attention
projections, the dense MLP, the shared experts and lm_head pack-quantized (compressed-tensors INT4,
group 32, symmetric: what llama.cpp's Q4_0 and vLLM's weight-only INT4 schemes do to every matrix).
Loaded with the CPU int4 layout (`loader.load_model`, `int4_layout="cpu"`), such a layer becomes an
`Int4Linear` holding torch's CPU int4 tiles (uint8 [out, in/2], the layout of the INT4 routed experts)
and a [in/group, out, 2] (scale, zero = 0) tensor in the model's dtype: a quarter of the bf16 weight's
bytes plus an eighth for the scales, read as such at every step. Elsewhere (the "ct" layout, GPUs) the
loader dequantises it into a plain `nn.Linear`, as before. `kv_b_proj` (read as a weight by the absorbed
attention) and the router stay dense.

Forward, by rows (tokens) and dtype:
- bf16, few rows (`kernel_rows`): a fused dequantising GEMV, `cpu_kernels.linear_int4` (the tiles read
  and unpacked once for up to four rows, in fp32) where the native kernels run, else torch's
  `aten._weight_int4pack_mm_for_cpu` (the same sums up to their order; Inductor lowers it in a
  captured step);
- bf16, more rows (prefill): the weight dequantised to bf16 for the call (`cpu_kernels.dequant_int4`,
  ~0.1 ns a weight from cache) and one `F.linear`: 4-8x faster than the fused kernel at 256 rows;
- fp32 (the parity tests' dtype): dequantised to the same [out, in] fp32 weight a dense model of the
  dequantised checkpoint holds, then `F.linear`: bit for bit that model's layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2serve.model import compiled_gemv, cpu_kernels
from k2serve.model.quant import dequantize_int4pack_cpu, int4pack_cpu_tiles, pack_int4_cpu_into

# bf16 rows up to which a call runs the fused INT4 GEMV instead of dequantising the weight for one
# F.linear: the two cross at ~20 rows on `small`'s layers (1024 x 1024: 184 / 257 us at 16 rows, 272 /
# 234 at 24) and past 32 on a 33M-weight lm_head, whose 66 MB dequantised copy does not stay in cache
# (32 rows: 11.0 / 22.5 ms); 2 threads, medians of 25 calls.
KERNEL_MAX_ROWS = 16
KERNEL_MAX_ROWS_LARGE = 64
LARGE_WEIGHTS = 16 << 20


def int4_linear_supported(out_features: int, in_features: int, group: int) -> bool:
    """Whether an [out, in] INT4 weight can be held as an `Int4Linear`: torch's CPU int4 kernel here,
    `in` a multiple of the group, and a tile layout `quant.dequantize_int4pack_cpu` reads (blocks that
    divide `out`, probed on one 64-row slice)."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") or in_features % group or out_features % 64:
        return False
    tiles = int4pack_cpu_tiles(64, in_features)
    return tiles is not None and 64 % tiles.block == 0


class Int4Linear(nn.Module):
    """A bias-free linear layer whose weight stays INT4 in torch's CPU tiles (see the module doc)."""

    w_i4: torch.Tensor
    w_sz: torch.Tensor

    def __init__(self, in_features: int, out_features: int, group: int, dtype: torch.dtype) -> None:
        super().__init__()
        if not int4_linear_supported(out_features, in_features, group):
            raise ValueError(
                f"an INT4 weight of {out_features} x {in_features}, group {group}: not supported"
            )
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.register_buffer("w_i4", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("w_sz", torch.empty(in_features // group, out_features, 2, dtype=dtype))
        self.native = cpu_kernels.int4_tiles_supported(out_features, in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}"

    def set_packed(self, packed: torch.Tensor, scale: torch.Tensor) -> None:
        """Fill from the compressed-tensors form: packed int32 [out, in/8], scale [out, in/group]."""
        pack_int4_cpu_into(packed, scale, self.w_i4, self.w_sz)

    def dequantized(self) -> torch.Tensor:
        """The dense weight [out, in] in the model's dtype, W = (q - 8) * scale (a fresh tensor)."""
        tiles = int4pack_cpu_tiles(64, self.in_features)  # the layout repeats per block of 64 rows
        assert tiles is not None  # int4_linear_supported checked it
        w_t = dequantize_int4pack_cpu(self.w_i4, self.w_sz[..., 0], tiles, self.w_sz.dtype)  # [in, out]
        return w_t.t().contiguous()

    def kernel_rows(self, rows: int) -> bool:
        """Whether a bf16 call of `rows` rows runs the fused INT4 GEMV (else dequantise + F.linear)."""
        limit = (
            KERNEL_MAX_ROWS_LARGE
            if self.in_features * self.out_features >= LARGE_WEIGHTS
            else KERNEL_MAX_ROWS
        )
        return rows <= limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if x.dtype != self.w_sz.dtype:
            raise TypeError(f"Int4Linear holds {self.w_sz.dtype} scales; input is {x.dtype}")
        compiling = torch.compiler.is_compiling()
        native = self.native and (compiled_gemv.native_on() if compiling else cpu_kernels.available())
        if x.dtype != torch.bfloat16:
            y = F.linear(flat, self.dequantized())
        elif self.kernel_rows(flat.shape[0]):
            if native:
                y = cpu_kernels.linear_int4(flat.contiguous(), self.w_i4, self.w_sz, self.group)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    flat.contiguous(), self.w_i4, self.group, self.w_sz
                )
        elif native:
            y = F.linear(flat, cpu_kernels.dequant_int4(self.w_i4, self.w_sz, self.group).t())
        else:
            y = F.linear(flat, self.dequantized())
        return y.view(*x.shape[:-1], self.out_features)


def int4_linear_names(model: nn.Module) -> set[str]:
    """The names of `model`'s linear layers that may be held as `Int4Linear` when stored INT4: every
    `nn.Linear` but the attention's `kv_b_proj` (its weight is read directly by the absorbed attention)."""
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith("kv_b_proj")
    }


def replace_linear(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Put `layer` in place of the submodule called `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)
