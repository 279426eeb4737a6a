"""The Triton paged MLA kernels compiled for a GPU without one, at K2's head dims: triton lowers them to
PTX with its own LLVM and assembles a cubin with its bundled ptxas for sm_90 (H100/H200), in a process
without TRITON_INTERPRET. The interpreter tests widen bf16 operands to fp32 (the interpreter's bf16
`tl.dot` is wrong in triton 3.9), so this is where the bf16 `tl.dot` branch is checked: it compiles, on
tensor cores. Compiling is not running: the numbers come from the interpreter tests and, on a GPU,
`k2serve bench device`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INTS = ["num_keys", "num_block_cols", "block_size", "stride_block", "stride_row"]


def compile_kernel(name: str, act: str) -> dict[str, object]:
    """Compile kernel `name` ("absorbed" or "expanded") with `act` operands (bf16 or fp32) at K2's dims
    (latent 512, RoPE 64, nope 128, v 128) for sm_90; returns what the PTX and cubin hold."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

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
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    ptx = kernel.asm["ptx"]
    return {"mma": "mma" in ptx or "wgmma" in ptx, "cubin_bytes": len(kernel.asm["cubin"])}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_attention_kernels_compile_for_sm90_at_k2_dims() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(got) == {"absorbed-bf16", "expanded-bf16", "absorbed-fp32"}
    assert all(v["cubin_bytes"] > 1000 for v in got.values())
    assert got["absorbed-bf16"]["mma"] and got["expanded-bf16"]["mma"]  # bf16 operands on tensor cores


if __name__ == "__main__":  # the subprocess of the test: no TRITON_INTERPRET here
    variants = [("absorbed", "bf16"), ("expanded", "bf16"), ("absorbed", "fp32")]
    print(json.dumps({f"{k}-{a}": compile_kernel(k, a) for k, a in variants}))
