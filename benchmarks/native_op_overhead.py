"""Per-call cost of a native CPU op (model/cpu_kernels.py) on a tiny weight, where the kernel's own work is
~2 us: eager, inside a torch.compile'd function (as the captured step calls it), and the bare C call through ctypes.

    python benchmarks/native_op_overhead.py [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time

import torch

from k2serve.model import cpu_kernels


def per_call_us(fn: object, x: torch.Tensor, repeats: int, chain: int) -> float:
    fn(x)  # type: ignore[operator]
    t = time.perf_counter()
    for _ in range(repeats):
        fn(x)  # type: ignore[operator]
    return (time.perf_counter() - t) / repeats / chain * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    if not cpu_kernels.available():
        print(f"native CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
        return 1
    torch.set_num_threads(args.threads)
    chain = 50
    x, w = torch.randn(1, 64).bfloat16(), torch.randn(64, 64).bfloat16()

    def chained(x: torch.Tensor) -> torch.Tensor:
        for _ in range(chain):
            x = cpu_kernels.linear_bf16(x, w)
        return x

    compiled = torch.compile(chained, fullgraph=True)
    print(
        f"linear_bf16 [1, 64] x [64, 64]: eager {per_call_us(chained, x, args.repeats, chain):.1f} us a call"
    )
    print(
        f"linear_bf16 [1, 64] x [64, 64]: compiled {per_call_us(compiled, x, args.repeats, chain):.1f} us a call"
    )
    lib, y = cpu_kernels._lib(), torch.empty(1, 64, dtype=torch.bfloat16)  # noqa: SLF001 - the bare kernel
    lib.k2_linear_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3
    t = time.perf_counter()
    for _ in range(args.repeats * chain):
        lib.k2_linear_bf16(x.data_ptr(), w.data_ptr(), y.data_ptr(), 1, 64, 64)
    print(
        f"the bare C call through ctypes: {(time.perf_counter() - t) / (args.repeats * chain) * 1e6:.1f} us"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
