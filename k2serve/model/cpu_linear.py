"""bf16 linear layers on CPU through oneDNN with the weight prepacked once.

`F.linear` on a bf16 weight reads it at 7-11 GB/s per core here at batch 1 (why, inside torch, was
not traced); oneDNN with
the weight reordered once into its blocked layout (`mkldnn._reorder_linear_weight`, then
`mkldnn._linear_pointwise`, what Inductor's freezing does) reads it 1.1-1.8x faster at batch 1 on
this repo's host (`k2serve bench cpu-gemv`, BENCHMARKS.md "CPU linear kernels") and, up to
PREPACK_MAX_ROWS rows and PREPACK_MAX_IN inputs, gives F.linear's outputs bitwise
(tests/test_cpu_linear.py, on the model's shapes); larger calls and layers keep F.linear.

`prepack_linears(model)` switches a model's bf16 CPU `nn.Linear` modules to `PrepackedLinear` (the same
module, parameters and state dict; only `forward` differs). The packed copy is made on the first call
(so a layer never run this way, e.g. `kv_b_proj` of a decode-only worker whose attention reads the
weight directly, costs nothing) and remade whenever the weight changes in place. It is held beside
the dense weight, which the state dict, weight absorption and tied embeddings keep reading: a packed
layer holds its weight twice. fp32 models keep `F.linear` (MKL's sgemv is already the faster path
there, and the parity tests run in fp32), as do inputs of another dtype or device and autograd. Traced
by torch.compile, a layer keeps F.linear unless the captured step asked for the packed kernel
(model/compiled_gemv.py, on by default there), which it then calls as an opaque op on the copy packed
beforehand by an eager call (`packed_layers`); a traced one-row call of a layer of at most
`compiled_gemv.NATIVE_LINEAR_MAX_WEIGHTS` weights runs the native bf16 GEMV (model/cpu_kernels.py) on
the dense weight instead, where that kernel is available.
"""

from __future__ import annotations

import os
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from k2serve.model import compiled_gemv, cpu_kernels

# K2SERVE_CPU_PREPACK=0, read at import, keeps every linear layer on F.linear (the path before this one).
ENABLED = os.environ.get("K2SERVE_CPU_PREPACK", "1") != "0"

# Rows (tokens) up to which a call takes the packed path: where it was faster in both runs of
# `k2serve bench cpu-gemv` (1.0-1.4x at 8 rows on `small`'s layers; at 32 rows 0.95-1.2x in one run and
# 0.8-0.9x in the other, BENCHMARKS.md "CPU linear kernels"). Up to 32 rows oneDNN's packed kernel gave
# F.linear's outputs bit for bit on every tested shape (tests/test_cpu_linear.py); from 48 rows it sums
# in another order and some outputs move by a bf16 ulp, so this must stay <= 32 to keep tokens.
PREPACK_MAX_ROWS = 8
# Input features up to which layers are switched at all: with 7168 or 8192 inputs (K2's hidden size
# and o_proj) oneDNN splits the sum differently from F.linear and 1-32 row calls differ by a bf16 ulp
# on some outputs; up to 4096 (every layer of `small`, K2's q_b_proj, kv_b_proj and expert down_proj)
# every tested shape and row count was bitwise equal. Measured on this torch (2.13) and CPU (AVX512,
# AMX); the tests re-check it on the machine at hand.
PREPACK_MAX_IN = 4096

_MKLDNN = torch.ops.mkldnn  # the ops Inductor's CPU lowering calls; underscored in torch, public in aten


def prepack_supported() -> bool:
    """Whether this torch build and CPU run oneDNN bf16 linear layers with prepacked weights."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(_MKLDNN, "_reorder_linear_weight")
        and hasattr(_MKLDNN, "_linear_pointwise")
        and bool(_MKLDNN._is_mkldnn_bf16_supported())  # noqa: SLF001
    )


class PrepackedLinear(nn.Linear):
    """An `nn.Linear` whose bf16 CPU forward runs oneDNN on a weight packed once (see the module doc)."""

    packed: torch.Tensor | None
    packed_version: int

    def forget_packed(self) -> None:
        """Drop the packed copy (the next bf16 call packs the weight again)."""
        self.packed = None
        self.packed_version = -1

    def packed_weight(self) -> torch.Tensor:
        """The weight in oneDNN's layout, packed now if it never was or the weight changed since."""
        version = self.weight._version  # noqa: SLF001 (torch's in-place write counter)
        if self.packed is None or self.packed_version != version:
            with torch.no_grad():
                self.packed = _MKLDNN._reorder_linear_weight(self.weight.detach(), 1)  # noqa: SLF001
            self.packed_version = version
        return self.packed

    def packable(self, x: torch.Tensor) -> bool:
        """Whether the packed kernel applies to `x`: bf16 input and weight on the CPU, at most
        PREPACK_MAX_ROWS rows, no autograd."""
        w = self.weight
        return (
            x.dtype == torch.bfloat16
            and x.numel() <= PREPACK_MAX_ROWS * x.shape[-1]
            and w.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and w.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        )

    def uses_packed(self, x: torch.Tensor) -> bool:
        """Whether `forward(x)` takes the prepacked path: `packable(x)`, and either eager or traced by
        torch.compile for a captured step that asked for it (`compiled_gemv.options`) with the weight
        already packed (by an eager call: packing is not traced into the graph)."""
        if not self.packable(x):
            return False
        if torch.compiler.is_compiling():
            return compiled_gemv.packed_on() and self.packed is not None
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_packed(x):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
        bias = None if self.bias is None else self.bias.detach()
        if (
            torch.compiler.is_compiling()
            and compiled_gemv.native_linear(flat.shape[0], self.weight.numel())
            and self.weight.is_contiguous()
        ):
            y = cpu_kernels.linear_bf16(flat.contiguous(), self.weight.detach())
            if bias is not None:
                y = y + bias
        elif torch.compiler.is_compiling():
            assert self.packed is not None  # uses_packed checked it
            y = compiled_gemv.packed_linear(flat, self.packed, bias, self.out_features)
        else:
            y = _MKLDNN._linear_pointwise(flat, self.packed_weight(), bias, "none", [None], "")  # noqa: SLF001
        return y.view(*x.shape[:-1], y.shape[-1])


def packed_layers(model: nn.Module) -> list[PrepackedLinear]:
    """The `PrepackedLinear` layers of `model` that hold a packed copy (ran the packed path eagerly).
    A compiled step reads those copies as they are: calling `packed_weight()` on each before a step
    repacks the ones whose weight changed in place since."""
    return [m for m in model.modules() if isinstance(m, PrepackedLinear) and m.packed is not None]


def prepack_linears(model: nn.Module) -> int:
    """Switch `model`'s bf16 CPU `nn.Linear` modules of at most PREPACK_MAX_IN inputs to `PrepackedLinear`
    (in place; packing happens on first use). Returns how many were switched: 0 when disabled
    (K2SERVE_CPU_PREPACK=0) or unsupported."""
    if not ENABLED or not prepack_supported():
        return 0
    switched = 0
    for module in model.modules():
        if (
            type(module) is nn.Linear
            and module.weight.dtype == torch.bfloat16
            and module.weight.device.type == "cpu"
            and module.in_features <= PREPACK_MAX_IN
        ):
            module.__class__ = PrepackedLinear
            cast(PrepackedLinear, module).forget_packed()
            switched += 1
    return switched


def set_prepacked(model: nn.Module, on: bool) -> int:
    """Switch the linears `prepack_linears` switched between `PrepackedLinear` (on) and plain `nn.Linear`
    (off), keeping their packed copies (benchmarks alternate the two paths on one model). Returns how
    many modules it switched."""
    target: type[nn.Linear] = PrepackedLinear if on else nn.Linear
    switched = 0
    for module in model.modules():
        was_packed = isinstance(getattr(module, "packed_version", None), int)
        if type(module) in (nn.Linear, PrepackedLinear) and was_packed and type(module) is not target:
            module.__class__ = target
            switched += 1
    return switched
