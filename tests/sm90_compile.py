"""Shared by the kernels' compile tests: compile a Triton kernel for sm_90 (H100/H200) without a GPU,
and run a test file's `__main__` in a subprocess without TRITON_INTERPRET (the test process has it set
by conftest, and triton reads it when a kernel is decorated)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def compile_sm90(fn: Any, sig: dict[str, str], const: dict[str, object]) -> dict[str, object]:
    """Lower `fn` with pointer/scalar types `sig` (constexprs named there as "constexpr", valued in
    `const`) to PTX and a cubin for sm_90; returns whether the PTX uses tensor cores and the cubin size."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    ptx = kernel.asm["ptx"]
    return {"mma": "mma" in ptx or "wgmma" in ptx, "cubin_bytes": len(kernel.asm["cubin"])}


def run_uninterpreted(test_file: str) -> dict[str, Any]:
    """Run `test_file` as a script without TRITON_INTERPRET; its last stdout line is JSON, returned."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, test_file], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
