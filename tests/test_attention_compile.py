"""The Triton paged MLA kernels compiled for a GPU without one, at K2's head dims: triton lowers them to
PTX with its own LLVM and assembles a cubin with its bundled ptxas for sm_90 (H100/H200), in a process
without TRITON_INTERPRET. The interpreter tests widen bf16 operands to fp32 (the interpreter's bf16
`tl.dot` is wrong in triton 3.9), so this is where the bf16 `tl.dot` branch is checked: it compiles, on
tensor cores. Compiling is not running: the numbers come from the interpreter tests and, on a GPU,
`k2serve bench device`."""

from __future__ import annotations

import importlib.util
import json

import pytest
from sm90_compile import compile_sm90, run_uninterpreted

INTS = ["num_keys", "num_block_cols", "block_size", "stride_block", "stride_row"]


def compile_kernel(name: str, act: str) -> dict[str, object]:
    """Compile kernel `name` ("absorbed" or "expanded") with `act` operands (bf16 or fp32) at K2's dims
    (latent 512, RoPE 64, nope 128, v 128) for sm_90; returns what the PTX and cubin hold."""
    from k2serve.model import triton_attention, triton_attention_kernels

    paging = {"pages_ptr": f"*{act}", "blocks_ptr": "*i64", "key_pos_ptr": "*i64", "q_pos_ptr": "*i64"}
    outs = {"out_ptr": "*fp32", "lse_ptr": "*fp32"}
    block = {"bt": triton_attention.BLOCK_T, "widen": False, "ieee": act == "fp32"}
    if name == "absorbed":
        fn = triton_attention_kernels.absorbed_paged
        ptrs = {"q_ptr": f"*{act}"} | paging | outs
        ints = ["rows", "heads", "queries", *INTS]
        const = {"c_dim": 512, "dr": 64, "bc": 512, "bdr": 64, "br": triton_attention.BLOCK_R} | block
    else:
        fn = triton_attention_kernels.expanded_paged
        ptrs = {"qn_ptr": f"*{act}", "qpe_ptr": f"*{act}", "w_ptr": f"*{act}"} | paging | outs
        ints = ["heads", "queries", *INTS]
        const = {"c_dim": 512, "dn": 128, "dv": 128, "dr": 64, "bck": 64, "bdn": 128, "bdv": 128, "bdr": 64}
        const |= {"bq": triton_attention.BLOCK_R} | block
    sig = ptrs | dict.fromkeys(ints, "i32") | {"scale": "fp32"} | dict.fromkeys(const, "constexpr")
    assert list(sig) == list(fn.arg_names), (list(sig), fn.arg_names)
    return compile_sm90(fn, sig, const)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_attention_kernels_compile_for_sm90_at_k2_dims() -> None:
    got = run_uninterpreted(__file__)
    assert set(got) == {"absorbed-bf16", "expanded-bf16", "absorbed-fp32"}
    assert all(v["cubin_bytes"] > 1000 for v in got.values())
    assert got["absorbed-bf16"]["mma"] and got["expanded-bf16"]["mma"]  # bf16 operands on tensor cores


if __name__ == "__main__":  # the subprocess of the test: no TRITON_INTERPRET here
    variants = [("absorbed", "bf16"), ("expanded", "bf16"), ("absorbed", "fp32")]
    print(json.dumps({f"{k}-{a}": compile_kernel(k, a) for k, a in variants}))
