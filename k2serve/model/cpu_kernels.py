"""Native bf16 GEMV kernels for the captured decode step on CPU (csrc/cpu_gemv.c; issue 16 item 2).

Inside the compiled step Inductor's gathered-expert reductions read the routed experts' weights at
~13 GB/s on two threads and oneDNN's prepacked linears at ~20 GB/s, against ~30 GB/s of streaming read
on this host (BENCHMARKS.md, "Native GEMV kernels"). These kernels multiply bf16 pairs with AVX512-BF16
(VDPBF16PS, exact products summed in fp32) and round each output to bf16 where the torch code they
replace rounds: `moe_bf16` computes `compiled_gemv.gathered_experts_torch` (both GEMVs, SwiGLU and the
weighted sum of the k experts in one call, reading only the routed experts), `linear_bf16` an
`F.linear` without bias. They sum in another order than torch, so an output may differ from torch's by
a bf16 rounding step (tests/test_cpu_kernels.py bounds it); the fp32 step never uses them. Where the CPU
has AMX-BF16, `moe_bf16_amx` runs the bf16 routed experts of 2 to 256 rows an expert on AMX tiles
(TDPBF16PS): memory-bound from ~4 rows an expert, where the VDPBF16PS kernels are compute-bound.
`linear_int4` and `dequant_int4` serve INT4 linear layers (model/int4_linear.py) in torch's CPU int4
tiles, and `mla_decode` the captured step's absorbed MLA attention of a layer (engine/captured.py).

The C source ships with the package with the ops' C++ glue (csrc/cpu_ops.cpp: each op's checks,
allocations and C call, registered with torch's dispatcher, so a call from a captured step runs no
Python). Both are compiled at first use (`$CC`, else `cc`, and `$CXX`, else `c++`, against this torch's
headers and libraries; torch.compile's CPU backend needs a compiler already; ~10 s) into one library in
`~/.cache/k2serve/cpu-kernels/<hash>/`, keyed by the sources, the compilers' versions, the flags and the
torch version, so it is built once per machine and torch. It is loaded with `torch.ops.load_library`
(the ops' CPU kernels register) and ctypes (a few setup calls), and runs on torch's own OpenMP runtime
(the same libgomp.so.1, already loaded), so `torch.set_num_threads` sets its threads too. Nothing here
runs where the CPU lacks AVX512-BF16, the build fails, or `K2SERVE_CPU_KERNELS=0` (read at import):
`available()` is then False with a reason (`unavailable_reason()`), an op called anyway raises it, and
the step keeps the Inductor / oneDNN paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, cast

import torch

logger = logging.getLogger(__name__)

ENABLED = os.environ.get("K2SERVE_CPU_KERNELS", "1") != "0"
SOURCE = Path(__file__).parent / "csrc" / "cpu_gemv.c"
OPS_SOURCE = Path(__file__).parent / "csrc" / "cpu_ops.cpp"
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-std=c11"]
CXX_FLAGS = ["-O2", "-fPIC", "-std=c++17", "-w"]
AMX_ENABLED = os.environ.get("K2SERVE_AMX", "1") != "0"
# bf16 (token, expert) rows an expert (on average: rows / experts) from which `routed_bf16` runs the AMX
# kernel instead of the VDPBF16PS grouped one. One `small` MoE layer's experts, 2 threads, medians of 3
# alternating rounds (benchmarks/moe_kernels_probe.py; BENCHMARKS.md "AMX expert kernel"): grouped / AMX
# time 0.94 at 1 row an expert, 1.32 at 4, 2.14 at 8, 5.1 at 64.
AMX_MIN_ROWS_PER_EXPERT = 2
ABI = 7  # k2_cpu_gemv_abi() of the source this module calls; a cached build of another source is not it


def cache_dir() -> Path:
    """Where built kernels are kept (per user)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "k2serve" / "cpu-kernels"


def compiler() -> str | None:
    """The C compiler to build with: $CC, else `cc`, if on PATH."""
    return shutil.which(os.environ.get("CC", "cc"))


def cxx_compiler() -> str | None:
    """The C++ compiler the ops' glue (csrc/cpu_ops.cpp) is built with: $CXX, else `c++`, if on PATH."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _torch_build_args() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for code against this torch's C++ library."""
    root = Path(torch.__file__).parent
    abi = int(torch.compiled_with_cxx11_abi())
    includes = [f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}"]
    lib = root / "lib"
    return [*includes, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"], [
        f"-L{lib}",
        f"-Wl,-rpath,{lib}",
        "-lc10",
        "-ltorch_cpu",
    ]


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)  # noqa: S603 - own sources, PATH tools
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed on {what}: {proc.stderr.strip()[-2000:]}")


def _build(cc: str, cxx: str | None = None) -> Path:
    """Compile SOURCE (C, the kernels) and OPS_SOURCE (C++, the ops calling them) into one library, once per
    sources, compilers, flags and torch build, and return its path."""
    cxx = cxx or cxx_compiler() or "c++"
    versions = "".join(
        subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout  # noqa: S603
        for tool in (cc, cxx)
    )
    cflags, ldflags = _torch_build_args()
    key = hashlib.sha256(
        SOURCE.read_bytes()
        + OPS_SOURCE.read_bytes()
        + versions.encode()
        + " ".join(FLAGS + CXX_FLAGS + cflags + ldflags).encode()
        + torch.__version__.encode()
    ).hexdigest()[:16]
    target = cache_dir() / key / "cpu_gemv.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        c_obj, cxx_obj, built = Path(tmp) / "cpu_gemv.o", Path(tmp) / "cpu_ops.o", Path(tmp) / "cpu_gemv.so"
        _run([cc, *FLAGS, "-c", str(SOURCE), "-o", str(c_obj)], SOURCE.name)
        _run([cxx, *CXX_FLAGS, *cflags, "-c", str(OPS_SOURCE), "-o", str(cxx_obj)], OPS_SOURCE.name)
        _run(
            [cxx, "-shared", "-fopenmp", str(c_obj), str(cxx_obj), "-o", str(built), *ldflags, "-lm"],
            "linking",
        )
        os.replace(built, target)  # atomic: a concurrent builder's copy is the same bytes
    return target


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why not)."""
    if not ENABLED:
        return None, "K2SERVE_CPU_KERNELS=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"needs x86-64 Linux (this is {platform.system()} {platform.machine()})"
    cc, cxx = compiler(), cxx_compiler()
    if cc is None:
        return None, f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH"
    if cxx is None:
        return None, f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    try:
        path = _build(cc, cxx)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("native CPU kernels not built: %s", e)
        return None, f"build failed: {e}"
    if lib.k2_cpu_gemv_abi() != ABI:
        return None, f"library ABI {lib.k2_cpu_gemv_abi()} is not {ABI}"
    if not lib.k2_cpu_gemv_supported():
        return None, "this CPU has no AVX512-BF16"
    torch.ops.load_library(str(path))  # the ops' CPU kernels (cpu_ops.cpp) register with the dispatcher
    lib.k2_set_amx.argtypes = lib.k2_set_int4_tiles.argtypes = [ctypes.c_int]
    global _amx  # noqa: PLW0603 - found once with the library; read by routed_bf16, also under trace
    _amx = AMX_ENABLED and bool(lib.k2_amx_init())
    lib.k2_set_amx(int(_amx))
    lib.k2_set_int4_tiles(int(_int4_tiles_are_avx512()))
    return lib, ""


def _int4_tiles_are_avx512() -> bool:
    """Whether this torch packs INT4 weights in AVX512's tiles (blocks of 64 rows, byte j = rows j and
    j + 32), the form the INT4 kernels read: `int4_tiles_supported` once on a 64 x 64 weight."""
    return hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu") and int4_tiles_supported(64, 64)


def available() -> bool:
    """Whether the kernels run here (built and loaded on the first call)."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why `available()` is False ("" when it is True)."""
    return _load()[1]


_amx = False  # set by _load: a module global, so a traced forward reads (and guards on) a plain value


def amx_available() -> bool:
    """Whether `moe_bf16_amx` runs here: the kernels load, the CPU has AMX-BF16 and Linux lets this
    process use the tile state (asked once, when the library loads; `K2SERVE_AMX=0`, read at import,
    turns it off)."""
    return _load()[0] is not None and _amx


def amx_on() -> bool:
    """`amx_available()` once the library has loaded (False before): a plain read, for traced code."""
    return _amx


def amx_shapes_supported(hidden: int, inter: int) -> bool:
    """Whether `moe_bf16_amx` takes experts of these sizes (whole 64-feature output blocks, 32-input steps)."""
    return hidden % 64 == 0 and inter % 32 == 0


def _lib() -> ctypes.CDLL:
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {why}")
    return lib


def routing_args(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, routing weights and ids as the routed-expert kernels take them: contiguous, fp32 weights,
    int64 ids (the model's router gives them so already; then nothing is copied)."""
    return x.contiguous(), weights.to(torch.float32).contiguous(), ids.to(torch.int64).contiguous()


# The ops' schemas and fake (shape) kernels are defined here, on a `torch.library.Library` fragment, at
# import; their CPU kernels are C++ (csrc/cpu_ops.cpp, in the library `_load` builds and loads): the
# checks, the allocations and the C kernel's call without Python in between (a captured `moe200m` step
# makes ~65 of these calls; a Python kernel cost 5-15 us of each). Each takes contiguous CPU tensors of
# the dtypes below and raises ValueError naming what does not fit; where the library cannot load
# (`available()`), RuntimeError with the reason.
_LIB = torch.library.Library("k2serve", "FRAGMENT")

_BF16_ARGS = "(Tensor x, Tensor weights, Tensor ids, Tensor w13, Tensor w2) -> Tensor"
_INT4_ARGS = (
    "(Tensor x, Tensor weights, Tensor ids, Tensor w13, Tensor w13_sz, Tensor w2, Tensor w2_sz, int group)"
    " -> Tensor"
)


def _op(schema: str) -> Any:
    """Define `k2serve::<schema>` and return the op (`torch.ops.k2serve.<name>`). Until the library has
    loaded, the op's CPU calls land on a Python kernel (CompositeExplicitAutograd: the C++ CPU kernel
    takes precedence once registered) that loads it and calls the op again, or says why it cannot."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    op = getattr(torch.ops.k2serve, name)

    def load_then_call(*args: Any) -> torch.Tensor:
        if not available():
            raise RuntimeError(f"native CPU kernels unavailable: {unavailable_reason()}")
        return cast(torch.Tensor, op.default(*args))

    _LIB.impl(name, load_then_call, "CompositeExplicitAutograd")
    return op


# x [T, D] @ w [N, D].T -> [T, N], bf16 (no bias).
linear_bf16 = _op("linear_bf16(Tensor x, Tensor w) -> Tensor")

# `compiled_gemv.gathered_experts` in one call: x [T, D] bf16, routing weights fp32 / ids int64 [T, k],
# w13 [E, 2I, D] and w2 [E, D, I] bf16 -> [T, D].
moe_bf16 = _op("moe_bf16" + _BF16_ARGS)

# `moe_bf16`'s result bit for bit, with the work grouped by expert: each routed expert's weights are read
# once for all the (token, slot) rows routed to it, up to four rows per load, where `moe_bf16` reads them
# once per row. For batches whose tokens share experts.
moe_bf16_grouped = _op("moe_bf16_grouped" + _BF16_ARGS)

# `moe_bf16_grouped`'s computation on AMX tiles (TDPBF16PS): the same roundings, AMX's order of the fp32
# sums, so an output may differ from `moe_bf16`'s by a bf16 rounding step. Each routed expert's weights
# are read once per 16 of its rows. Needs `amx_available()` and `amx_shapes_supported`; its scratch is
# kept per thread between calls (up to 512 MB: a fresh 100 MB per prefill layer was faulted in page by
# page, ~40% of the call).
moe_bf16_amx = _op("moe_bf16_amx" + _BF16_ARGS)

# `compiled_gemv.gathered_experts_int4_torch` in one call: x [T, D] bf16, routing weights fp32 / ids
# int64 [T, k], INT4 experts in torch's CPU tiles (`RoutedExperts` "cpu" layout): w13 uint8 [E, 2I, D/2]
# with w13_sz bf16 [E, D/group, 2I, 2], w2 [E, D, I/2] with w2_sz [E, I/group, D, 2].
moe_int4 = _op("moe_int4" + _INT4_ARGS)

# `moe_int4`'s result bit for bit, with the work grouped by expert: each routed expert's tiles are read and
# unpacked once for all the rows routed to it, up to four rows per read.
moe_int4_grouped = _op("moe_int4_grouped" + _INT4_ARGS)

# x [T, K] bf16 @ W.T -> [T, N] bf16 for an INT4 weight W [N, K] in torch's CPU tiles (w uint8 [N, K/2],
# sz bf16 [K/group, N, 2]: what `aten._weight_int4pack_mm_for_cpu(x, w, group, sz)` takes), each output
# the fp32 sum rounded once (`int4_tiles_supported(N, K)`, K a multiple of `group`).
linear_int4 = _op("linear_int4(Tensor x, Tensor w, Tensor sz, int group) -> Tensor")

# The dense bf16 weight of an INT4 one W [N, K] in torch's CPU tiles (w uint8 [N, K/2], sz bf16
# [K/group, N, 2]), transposed: [K, N] (`F.linear(x, out.t())`), W = (q - 8) * scale + zero in fp32
# rounded to bf16 (`int4_tiles_supported`).
dequant_int4 = _op("dequant_int4(Tensor w, Tensor sz, int group) -> Tensor")

# The captured decode step's absorbed MLA attention for one layer (`captured.StaticDecodeAttention` in
# bf16): q_nope [B, H, dn] and q_pe [B, H, dr] bf16, the latent pool kv [layers, blocks, bs, C + dr] bf16
# read at `layer` through block_tables [B, NB] int64 up to positions [B] int64 (each row's keys
# 0..position; a position or table entry outside the pool is refused), wkv = kv_b_proj's weight
# [H * (dn + dv), C] bf16 (W_UK and W_UV per head) -> [B, H, dv] bf16, with the torch code's roundings.
mla_decode = _op(
    "mla_decode(Tensor q_nope, Tensor q_pe, Tensor kv, int layer, Tensor block_tables, Tensor positions, "
    "Tensor wkv, float scale) -> Tensor"
)


def int4_tiles_supported(out_f: int, in_f: int) -> bool:
    """Whether the INT4 kernels here read an [out_f, in_f] INT4 weight as this torch packs it: AVX512's
    tiles (blocks of 64 rows, byte j = rows j and j + 32; probed by `quant.int4pack_cpu_tiles` on one
    block of 64 rows, since the layout repeats per block: a probe of a whole lm_head would take GBs)."""
    from k2serve.model.quant import int4pack_cpu_tiles

    if out_f % 64 or in_f % 2:
        return False
    tiles = int4pack_cpu_tiles(64, in_f)
    return tiles is not None and tiles.block == 64 and tiles.rows is None


def int4_shapes_supported(hidden: int, inter: int, group: int) -> bool:
    """Whether `moe_int4` takes experts of these sizes: both multiples of 64 and of the group size, and
    torch's tiles of the AVX512 form for w13 and w2."""
    return (
        all(n % 64 == 0 and n % group == 0 for n in (hidden, inter))
        and int4_tiles_supported(2 * inter, hidden)
        and int4_tiles_supported(hidden, inter)
    )


@torch.library.register_fake("k2serve::linear_bf16", lib=_LIB)
def _linear_bf16_shape(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.register_fake("k2serve::linear_int4", lib=_LIB)
def _linear_int4_shape(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.register_fake("k2serve::dequant_int4", lib=_LIB)
def _dequant_int4_shape(w: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    return sz.new_empty(w.shape[1] * 2, w.shape[0])


@torch.library.register_fake("k2serve::mla_decode", lib=_LIB)
def _mla_decode_shape(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    positions: torch.Tensor,
    wkv: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    dv = wkv.shape[0] // q_nope.shape[1] - q_nope.shape[2]
    return q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], dv)


def _shaped_as_x(x: torch.Tensor, *rest: object) -> torch.Tensor:
    """The routed-expert ops' fake (shape) kernel: the output is shaped as the input rows x."""
    return torch.empty_like(x)


for _name in ("moe_bf16", "moe_bf16_grouped", "moe_bf16_amx", "moe_int4", "moe_int4_grouped"):
    torch.library.register_fake(f"k2serve::{_name}", _shaped_as_x, lib=_LIB)


def routed_bf16(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """A layer's bf16 routed experts through the native kernels: `moe_bf16` for one token,
    `moe_bf16_grouped` (the same outputs, each expert read once for all its rows) from two on, and
    `moe_bf16_amx` from `AMX_MIN_ROWS_PER_EXPERT` rows an expert where AMX runs (`amx_available()`,
    read from the state the library's load set, so a traced call reads a constant); the routing
    arguments converted by `routing_args`."""
    t, k = ids.shape
    if (
        _amx
        and t * k >= AMX_MIN_ROWS_PER_EXPERT * w13.shape[0]
        and amx_shapes_supported(w2.shape[1], w2.shape[2])
    ):
        kernel = moe_bf16_amx
    else:
        kernel = moe_bf16_grouped if t > 1 else moe_bf16
    return kernel(*routing_args(x, weights, ids), w13, w2)


def routed_int4(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w13_sz: torch.Tensor,
    w2: torch.Tensor,
    w2_sz: torch.Tensor,
    group: int,
) -> torch.Tensor:
    """`routed_bf16` for INT4 experts in torch's CPU tiles: `moe_int4` for one token, `moe_int4_grouped`
    from two on."""
    kernel = moe_int4_grouped if ids.shape[0] > 1 else moe_int4
    return kernel(*routing_args(x, weights, ids), w13, w13_sz, w2, w2_sz, group)
