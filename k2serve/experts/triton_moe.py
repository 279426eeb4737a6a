"""The Triton expert kernels (k2serve/model/triton_moe.py, where the model's `--moe-backend triton` path
reaches them) and `run_sorted`, the expert-parallel dispatcher's step over them: the rows it received,
already grouped by local expert, through the fused kernels with top-k 1 and no routing weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from k2serve.model.moe import RoutedExperts
from k2serve.model.triton_moe import (
    BLOCK_M,
    GroupedGemmError,
    grouped_gemm_dense,
    grouped_gemm_int4,
    triton_available,
)

__all__ = [
    "BLOCK_M",
    "GroupedGemmError",
    "grouped_gemm_dense",
    "grouped_gemm_int4",
    "run_sorted",
    "triton_available",
]


def run_sorted(
    experts: RoutedExperts, x: torch.Tensor, counts: Sequence[int], backend: str = "auto"
) -> torch.Tensor:
    """`experts.run_sorted` (x [N, D] grouped by local expert -> SwiGLU outputs [N, D]), with the two
    GEMMs of INT4 experts held in the compressed-tensors layout (`w13_packed`, ...) going through
    fused kernels (`RoutedExperts.run_triton`) when the backend resolves to triton; any other case is
    `experts.run_sorted`."""
    use_triton = backend == "triton" or (backend == "auto" and x.is_cuda and triton_available())
    if not use_triton or experts.int4_group_size is None or not hasattr(experts, "w13_packed"):
        return experts.run_sorted(x, counts)  # under --moe-backend triton: the kernel there too
    return experts.run_triton(x, counts)
