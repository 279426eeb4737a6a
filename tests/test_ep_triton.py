"""The Triton INT4 grouped GEMM against the torch path, on CPU tensors under TRITON_INTERPRET=1.

The interpreter runs the kernel in numpy, slowly: sizes stay tiny. On a GPU the same kernel is
compiled; `grouped_gemm_int4(..., backend="auto")` picks it for CUDA tensors.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from k2serve.config import ModelConfig
from k2serve.experts.triton_moe import GroupedGemmError, grouped_gemm_int4, run_sorted
from k2serve.model.moe import RoutedExperts
from k2serve.model.presets import PRESETS
from k2serve.model.quant import pack_int4, quantize_int4

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton==3.9.0)"
)


@pytest.fixture(autouse=True)
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernel is first built, in the test


def int4_experts(n: int, out_f: int, in_f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n random experts in the compressed-tensors form: packed int32 [n, O, K/8], bf16 scales [n, O, K/32]."""
    g = torch.Generator().manual_seed(seed)
    parts = [quantize_int4(torch.randn(out_f, in_f, generator=g), 32) for _ in range(n)]
    return torch.stack([pack_int4(q) for q, _ in parts]), torch.stack([s for _, s in parts]).to(
        torch.bfloat16
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_matches_torch(dtype: torch.dtype) -> None:
    packed, scale = int4_experts(4, 48, 64, seed=0)  # O = 48: a partial column block
    counts = [5, 0, 17, 1]  # an empty expert, a group over one row block, a single row
    x = torch.randn(sum(counts), 64, generator=torch.Generator().manual_seed(1)).to(dtype)  # [N, K]
    got = grouped_gemm_int4(x, packed, scale, counts, backend="triton")
    want = grouped_gemm_int4(x, packed, scale, counts, backend="torch")
    assert got.dtype == dtype and got.shape == (23, 48)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: output rounding after different sum orders
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()


def test_no_rows_and_bad_shapes() -> None:
    packed, scale = int4_experts(2, 32, 64, seed=2)
    out = grouped_gemm_int4(torch.zeros(0, 64), packed, scale, [0, 0], backend="triton")
    assert out.shape == (0, 32)
    with pytest.raises(GroupedGemmError, match="counts"):
        grouped_gemm_int4(torch.zeros(3, 64), packed, scale, [1, 1], backend="triton")
    with pytest.raises(GroupedGemmError, match="packed"):
        grouped_gemm_int4(torch.zeros(3, 32), packed, scale, [3, 0], backend="triton")
    with pytest.raises(GroupedGemmError, match="backend"):
        grouped_gemm_int4(torch.zeros(3, 64), packed, scale, [3, 0], backend="cuda")


def test_swiglu_experts_match_run_sorted() -> None:
    """Both GEMMs of an INT4 RoutedExperts (w13, then SwiGLU in torch, then w2) through the kernel."""
    config = ModelConfig.from_dict(PRESETS["tiny"] | {"hidden_size": 64, "moe_intermediate_size": 32})
    experts = RoutedExperts(config, expert_ids=[3, 7, 11], int4_group_size=32, dtype=torch.float32)
    w13_p, w13_s = int4_experts(3, 64, 64, seed=3)  # [E, 2I, D/8]
    w2_p, w2_s = int4_experts(3, 64, 32, seed=4)  # [E, D, I/8]
    with torch.no_grad():
        experts.w13_packed.copy_(w13_p)
        experts.w13_scale.copy_(w13_s)
        experts.w2_packed.copy_(w2_p)
        experts.w2_scale.copy_(w2_s)
    counts = [2, 0, 19]
    x = torch.randn(21, 64, generator=torch.Generator().manual_seed(5))
    got = run_sorted(experts, x, counts, backend="triton")
    want = experts.run_sorted(x, counts)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(run_sorted(experts, x, counts, backend="auto"), want)  # CPU default: torch
