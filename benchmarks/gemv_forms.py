"""Forms of a bf16 (or fp32) linear at 1 and 8 rows on CPU, eager and compiled: which reads the weight fastest.

    python benchmarks/gemv_forms.py [--threads 1] [--dtype bfloat16] [--rounds 30]

Per weight shape (`small`'s q_a_proj, dense down and gate_up, lm_head) and rows, paired rounds (every
round times every form once, order reversed every other round), medians: `F.linear` eager; the same
under torch.compile (Inductor's extern `mm`); the GEMV written as a reduction
`(x.unsqueeze(-2).float() * w.float()).sum(-1)` compiled (Inductor's vectorised C++ loop); oneDNN on a
prepacked weight (`mkldnn._linear_pointwise`, what `PrepackedLinear` and the captured step's
`k2serve::packed_linear` run; bf16 only); with --cpp-template, Inductor's CPP GEMM template (an
`nn.Linear` compiled with freezing, max_autotune and max_autotune_gemm_backends="CPP": the weight frozen
into a constant, autotuned per shape; minutes of compiling). GB/s = weight bytes / median time; the streaming read (sum of
a 128 MiB tensor) is measured first. This is what chose the kernels in k2serve/model/compiled_gemv.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = [(384, 1024), (1024, 2816), (5632, 1024), (32256, 1024)]


def reduction(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T as an fp32 reduction over the broadcast product (a GEMV Inductor writes as a loop)."""
    return (x.unsqueeze(-2).float() * w.float()).sum(-1).to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def cpp_template(w: torch.Tensor, x: torch.Tensor) -> Callable[[], object]:
    """x @ w.T through Inductor's CPP GEMM template: a linear layer holding w, compiled now (frozen weight,
    max-autotune over the CPP backend) for x's shape."""
    import torch._inductor.config as inductor_config

    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    layer.weight.data.copy_(w)
    step = torch.compile(layer, dynamic=False)
    with inductor_config.patch(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP"):
        step(x)
    return lambda: step(x)


def paired(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per form over `rounds` paired rounds."""
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        items = list(fns.items())
        for k, f in items if r % 2 == 0 else items[::-1]:
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--cpp-template", action="store_true", help="also Inductor's CPP GEMM template")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dt = getattr(torch, args.dtype)
    big = torch.ones(128 * 2**20 // 4)
    read = big.numel() * 4 / paired({"sum": big.sum}, 9)["sum"] / 1e9
    print(f"{args.dtype}, threads {args.threads}, streaming read {read:.1f} GB/s")
    torch.set_grad_enabled(False)  # freezing (--cpp-template) needs it; no form uses autograd
    c_linear = torch.compile(linear, dynamic=False)
    c_reduction = torch.compile(reduction, dynamic=False)
    for n, k in SHAPES:
        w = torch.randn(n, k).to(dt)
        for m in (1, 8):
            x = torch.randn(m, k).to(dt)
            fns: dict[str, Callable[[], object]] = {
                "F.linear": lambda x=x, w=w: F.linear(x, w),
                "compiled F.linear": lambda x=x, w=w: c_linear(x, w),
                "compiled reduction": lambda x=x, w=w: c_reduction(x, w),
            }
            if args.cpp_template:
                fns["CPP template"] = cpp_template(w, x)
            if dt == torch.bfloat16:
                packed = torch.ops.mkldnn._reorder_linear_weight(w, m)  # noqa: SLF001
                fns["oneDNN packed"] = lambda x=x, p=packed: torch.ops.mkldnn._linear_pointwise(  # noqa: SLF001
                    x, p, None, "none", [None], ""
                )
            paired(fns, 3)  # compiles, warm-up
            t = paired(fns, args.rounds)
            nbytes = w.numel() * w.element_size()
            cells = "  ".join(f"{f} {s * 1e6:.0f} us {nbytes / s / 1e9:.1f} GB/s" for f, s in t.items())
            print(f"{n}x{k} rows {m}: {cells}", flush=True)


if __name__ == "__main__":
    main()
