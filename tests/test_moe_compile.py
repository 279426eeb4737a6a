"""The fused MoE kernel compiled for a GPU without one: triton lowers it to PTX with its own LLVM and
assembles a cubin with its bundled ptxas for sm_90 (H100/H200), in a process without TRITON_INTERPRET
(the interpreter tests never exercise the compiled bf16 `tl.dot`, the reshape/split of the SwiGLU
accumulator, or the constexpr branches as the compiler sees them). Compiling is not running: the
numbers come from the interpreter tests and, on a GPU, `k2serve bench device`."""

from __future__ import annotations

import importlib.util
import json

import pytest
from sm90_compile import compile_sm90, run_uninterpreted


def compile_variant(act: str, int4: bool, pair: int) -> dict[str, object]:
    """Compile one variant (activations `act`, INT4 or dense weights, gate_up pair 2 or down pair 1)
    for sm_90; returns what the PTX and cubin hold."""
    from k2serve.model import triton_moe_kernels

    fn = triton_moe_kernels.fused_moe
    ptrs = {"a_ptr": f"*{act}", "w_ptr": "*i32" if int4 else f"*{act}", "scale_ptr": f"*{act}"}
    ptrs |= {"out_ptr": f"*{act}", "route_ptr": "*fp32", "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32"}
    ints = ["n_rows", "n_out", "k_dim", "stride_we", "stride_wr", "stride_se", "stride_sr", "a_div"]
    const = {"group": 32 if int4 else 1, "pair": pair, "weighted": pair == 1, "int4": int4, "widen": False}
    const |= {"ieee": act == "fp32", "bm": 16, "bn": 64, "bk": 64}
    sig = ptrs | {"n_padded_ptr": "*i32"} | dict.fromkeys(ints, "i32") | dict.fromkeys(const, "constexpr")
    return compile_sm90(fn, sig, const)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_compiles_for_sm90() -> None:
    got = run_uninterpreted(__file__)
    assert set(got) == {"bf16-int4-2", "bf16-dense-1", "fp32-int4-1"}
    assert all(v["cubin_bytes"] > 1000 for v in got.values())
    assert got["bf16-int4-2"]["mma"] and got["bf16-dense-1"]["mma"]  # bf16 operands on tensor cores


if __name__ == "__main__":  # the subprocess of the test: no TRITON_INTERPRET here
    variants = [("bf16", True, 2), ("bf16", False, 1), ("fp32", True, 1)]
    print(
        json.dumps({f"{a}-{'int4' if i else 'dense'}-{p}": compile_variant(a, i, p) for a, i, p in variants})
    )
