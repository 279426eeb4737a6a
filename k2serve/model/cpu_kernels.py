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

The C source ships with the package and is compiled at first use with the C compiler (`$CC`, else
`cc`; torch.compile's CPU backend needs one already) into `~/.cache/k2serve/cpu-kernels/<hash>/`,
keyed by the source, the compiler's version and the flags, so it is built once per machine. The
library is loaded with ctypes and runs on torch's own OpenMP runtime (the same libgomp.so.1, already
loaded), so `torch.set_num_threads` sets its threads too. Nothing here runs where the CPU lacks
AVX512-BF16, the build fails, or `K2SERVE_CPU_KERNELS=0` (read at import): `available()` is then False
with a reason (`unavailable_reason()`), and the step keeps the Inductor / oneDNN paths.
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
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

import torch

logger = logging.getLogger(__name__)

ENABLED = os.environ.get("K2SERVE_CPU_KERNELS", "1") != "0"
SOURCE = Path(__file__).parent / "csrc" / "cpu_gemv.c"
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
AMX_ENABLED = os.environ.get("K2SERVE_AMX", "1") != "0"
# bf16 (token, expert) rows an expert (on average: rows / experts) from which `routed_bf16` runs the AMX
# kernel instead of the VDPBF16PS grouped one. One `small` MoE layer's experts, 2 threads, medians of 3
# alternating rounds (benchmarks/moe_kernels_probe.py; BENCHMARKS.md "AMX expert kernel"): grouped / AMX
# time 0.94 at 1 row an expert, 1.32 at 4, 2.14 at 8, 5.1 at 64.
AMX_MIN_ROWS_PER_EXPERT = 2
ABI = 6  # k2_cpu_gemv_abi() of the source this module calls; a cached build of another source is not it


def cache_dir() -> Path:
    """Where built kernels are kept (per user)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "k2serve" / "cpu-kernels"


def compiler() -> str | None:
    """The C compiler to build with: $CC, else `cc`, if on PATH."""
    return shutil.which(os.environ.get("CC", "cc"))


def _build(cc: str) -> Path:
    """Compile SOURCE (once per source, compiler version and flags) and return the library's path."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout  # noqa: S603
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / key / "cpu_gemv.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / "cpu_gemv.so"
        proc = subprocess.run(  # noqa: S603 - the package's own source, a compiler found on PATH
            [cc, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], check=False, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: a concurrent builder's copy is the same bytes
    return target


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why not)."""
    if not ENABLED:
        return None, "K2SERVE_CPU_KERNELS=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"needs x86-64 Linux (this is {platform.system()} {platform.machine()})"
    cc = compiler()
    if cc is None:
        return None, f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH"
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("native CPU kernels not built: %s", e)
        return None, f"build failed: {e}"
    if lib.k2_cpu_gemv_abi() != ABI:
        return None, f"library ABI {lib.k2_cpu_gemv_abi()} is not {ABI}"
    if not lib.k2_cpu_gemv_supported():
        return None, "this CPU has no AVX512-BF16"
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.k2_linear_bf16.argtypes = [p, p, p, i, i, i]
    lib.k2_linear_bf16.restype = None
    lib.k2_moe_bf16.argtypes = [p, p, p, p, p, p, p, p, i, i, i, i, i]
    lib.k2_moe_bf16.restype = i
    lib.k2_moe_bf16_grouped.argtypes = [p] * 12 + [i] * 5
    lib.k2_moe_bf16_grouped.restype = i
    lib.k2_moe_int4.argtypes = [p] * 11 + [i] * 6
    lib.k2_moe_int4.restype = i
    lib.k2_moe_int4_grouped.argtypes = [p] * 15 + [i] * 6
    lib.k2_moe_int4_grouped.restype = i
    lib.k2_moe_bf16_amx.argtypes = [p] * 13 + [i] * 5
    lib.k2_moe_bf16_amx.restype = i
    lib.k2_linear_int4.argtypes = [p] * 4 + [i] * 4
    lib.k2_linear_int4.restype = i
    lib.k2_dequant_int4.argtypes = [p] * 3 + [i] * 3
    lib.k2_dequant_int4.restype = None
    lib.k2_mla_decode.argtypes = [p] * 6 + [ctypes.c_float] + [p] * 2 + [i] * 9
    lib.k2_mla_decode.restype = i
    lib.k2_amx_chunks.argtypes = [i, i]
    lib.k2_amx_chunks.restype = i
    global _amx  # noqa: PLW0603 - found once with the library; read by routed_bf16, also under trace
    _amx = AMX_ENABLED and bool(lib.k2_amx_init())
    return lib, ""


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


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, dims: int) -> None:
    if t.dtype != dtype or t.dim() != dims or not t.is_cpu or not t.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {dims}-d {dtype} CPU tensor, got {tuple(t.shape)} {t.dtype} "
            f"on {t.device}{'' if t.is_contiguous() else ', not contiguous'}"
        )


def _ptr(t: torch.Tensor) -> int:
    """The tensor's data address, as the library's pointer arguments take it (ctypes converts an int)."""
    return t.data_ptr()


def routing_args(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, routing weights and ids as the routed-expert kernels take them: contiguous, fp32 weights,
    int64 ids (the model's router gives them so already; then nothing is copied)."""
    return x.contiguous(), weights.to(torch.float32).contiguous(), ids.to(torch.int64).contiguous()


def _check_routing(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> None:
    _check("x", x, torch.bfloat16, 2)
    _check("weights", weights, torch.float32, 2)
    _check("ids", ids, torch.int64, 2)


def _refuse_bad_id(bad: int, ids: torch.Tensor, experts: int) -> None:
    """Raise for a kernel's bad-id return (1 + the flat (token, slot) position; 0: all ids fit)."""
    if bad:
        raise ValueError(
            f"expert id {int(ids.flatten()[bad - 1])} at (token, slot) {divmod(bad - 1, ids.shape[1])} is "
            f"outside [0, {experts})"
        )


# The ops are defined on a `torch.library.Library` fragment with a CPU kernel, not through
# `torch.library.custom_op`: the same schemas, fake kernels and torch.compile tracing (opcheck passes), but
# a call costs ~3 us of dispatch instead of ~9 (a captured `small` step makes 64 of them).
_LIB = torch.library.Library("k2serve", "FRAGMENT")

_BF16_ARGS = "(Tensor x, Tensor weights, Tensor ids, Tensor w13, Tensor w2) -> Tensor"
_INT4_ARGS = (
    "(Tensor x, Tensor weights, Tensor ids, Tensor w13, Tensor w13_sz, Tensor w2, Tensor w2_sz, int group)"
    " -> Tensor"
)
_OpImpl = TypeVar("_OpImpl", bound=Callable[..., torch.Tensor])


def _native_op(schema: str) -> Callable[[_OpImpl], _OpImpl]:
    """Define `k2serve::<schema>` with the decorated function as its CPU kernel; the decorated name
    becomes the op (`torch.ops.k2serve.<name>`), called as the function was."""

    def register(impl: _OpImpl) -> _OpImpl:
        name = schema.split("(", 1)[0]
        _LIB.define(schema)
        _LIB.impl(name, impl, "CPU")
        return cast(_OpImpl, getattr(torch.ops.k2serve, name))

    return register


@_native_op("linear_bf16(Tensor x, Tensor w) -> Tensor")
def linear_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, D] @ w [N, D].T -> [T, N], bf16 (no bias)."""
    _check("x", x, torch.bfloat16, 2)
    _check("w", w, torch.bfloat16, 2)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features, w {w.shape[1]}")
    y = x.new_empty(x.shape[0], w.shape[0])
    _lib().k2_linear_bf16(_ptr(x), _ptr(w), _ptr(y), x.shape[0], w.shape[0], x.shape[1])
    return y


@torch.library.register_fake("k2serve::linear_bf16", lib=_LIB)
def _linear_bf16_shape(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def _bf16_sizes(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> tuple[int, int, int, int, int]:
    """The bf16 expert ops' inputs checked: (tokens, k, experts, hidden, intermediate)."""
    _check_routing(x, weights, ids)
    _check("w13", w13, torch.bfloat16, 3)
    _check("w2", w2, torch.bfloat16, 3)
    t, k = ids.shape
    e, d, inter = w2.shape
    if x.shape != (t, d) or weights.shape != (t, k) or w13.shape != (e, 2 * inter, d):
        raise ValueError(
            f"shapes do not fit: x {tuple(x.shape)}, weights {tuple(weights.shape)}, ids {(t, k)}, "
            f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}"
        )
    return t, k, e, d, inter


@_native_op("moe_bf16" + _BF16_ARGS)
def moe_bf16(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """`compiled_gemv.gathered_experts` in one call: x [T, D] bf16, routing weights fp32 / ids int64
    [T, k], w13 [E, 2I, D] and w2 [E, D, I] bf16 -> [T, D]."""
    t, k, e, d, inter = _bf16_sizes(x, weights, ids, w13, w2)
    act = x.new_empty(t * k, inter)
    acc = torch.empty(t, d, dtype=torch.float32)
    out = torch.empty_like(x)
    tensors = (x, ids, weights, w13, w2, act, acc, out)
    _refuse_bad_id(_lib().k2_moe_bf16(*map(_ptr, tensors), t, k, d, inter, e), ids, e)
    return out


@_native_op("moe_bf16_grouped" + _BF16_ARGS)
def moe_bf16_grouped(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """`moe_bf16`'s result bit for bit, with the work grouped by expert: each routed expert's weights
    are read once for all the (token, slot) rows routed to it, up to four rows per load, where
    `moe_bf16` reads them once per row. For batches whose tokens share experts."""
    t, k, e, d, inter = _bf16_sizes(x, weights, ids, w13, w2)
    rows = t * k
    act = x.new_empty(rows, inter)
    yw = torch.empty(rows, d, dtype=torch.float32)
    order = torch.empty(rows, dtype=torch.int32)
    start = torch.empty(e + 1, dtype=torch.int32)
    xs = torch.empty(rows, dtype=torch.int64)  # row pointers
    used = torch.empty(e, dtype=torch.int32)
    out = torch.empty_like(x)
    tensors = (x, ids, weights, w13, w2, act, yw, order, start, xs, used, out)
    _refuse_bad_id(_lib().k2_moe_bf16_grouped(*map(_ptr, tensors), t, k, d, inter, e), ids, e)
    return out


# Scratch of the AMX expert op, kept per thread between calls (grown, never shrunk, up to
# SCRATCH_KEEP_BYTES): a fresh 100 MB of scratch per prefill layer (2,048 tokens of `small`) is mapped
# anew by the allocator and faulted in page by page, ~40% of the call's time under perf.
SCRATCH_KEEP_BYTES = 512 << 20
_scratch_local = threading.local()


def _scratch(*parts: tuple[tuple[int, ...], torch.dtype]) -> list[torch.Tensor]:
    """Tensors of these (shape, dtype)s, uninitialised, carved at 64-byte boundaries out of this
    thread's kept buffer (a new buffer past SCRATCH_KEEP_BYTES, not kept)."""
    sizes = [-(-torch.Size(shape).numel() * dtype.itemsize // 64) * 64 for shape, dtype in parts]
    total = sum(sizes)
    buf: torch.Tensor | None = getattr(_scratch_local, "buf", None)
    if buf is None or buf.numel() < total:
        buf = torch.empty(total, dtype=torch.uint8)
        if total <= SCRATCH_KEEP_BYTES:
            _scratch_local.buf = buf
    out, offset = [], 0
    for (shape, dtype), size in zip(parts, sizes, strict=True):
        out.append(buf[offset : offset + torch.Size(shape).numel() * dtype.itemsize].view(dtype).view(shape))
        offset += size
    return out


@_native_op("moe_bf16_amx" + _BF16_ARGS)
def moe_bf16_amx(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """`moe_bf16_grouped`'s computation on AMX tiles (TDPBF16PS): the same roundings, AMX's order of the
    fp32 sums, so an output may differ from `moe_bf16`'s by a bf16 rounding step. Each routed expert's
    weights are read once per 16 of its rows. Needs `amx_available()` and `amx_shapes_supported`."""
    t, k, e, d, inter = _bf16_sizes(x, weights, ids, w13, w2)
    if not amx_shapes_supported(d, inter):
        raise ValueError(f"experts of hidden {d}, intermediate {inter}: AMX needs multiples of 64 and 32")
    if not amx_available():
        raise RuntimeError("AMX-BF16 is not available on this CPU / process")
    rows = t * k
    lib = _lib()
    chunks = lib.k2_amx_chunks(rows, e)
    bx, ba, yw, order, start, cstart, used = _scratch(
        ((chunks, d, 16), torch.bfloat16),
        ((chunks, inter, 16), torch.bfloat16),
        ((rows, d), torch.float32),
        ((rows,), torch.int32),
        ((e + 1,), torch.int32),
        ((e + 1,), torch.int32),
        ((e,), torch.int32),
    )
    out = torch.empty_like(x)
    tensors = (x, ids, weights, w13, w2, bx, ba, yw, order, start, cstart, used, out)
    _refuse_bad_id(lib.k2_moe_bf16_amx(*map(_ptr, tensors), t, k, d, inter, e), ids, e)
    return out


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


def _int4_sizes(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w13_sz: torch.Tensor,
    w2: torch.Tensor,
    w2_sz: torch.Tensor,
    group: int,
) -> tuple[int, int, int, int, int]:
    """The INT4 expert ops' inputs checked: (tokens, k, experts, hidden, intermediate)."""
    _check_routing(x, weights, ids)
    _check("w13", w13, torch.uint8, 3)
    _check("w2", w2, torch.uint8, 3)
    _check("w13_sz", w13_sz, torch.bfloat16, 4)
    _check("w2_sz", w2_sz, torch.bfloat16, 4)
    t, k = ids.shape
    e, d, half_i = w2.shape
    inter = 2 * half_i
    if (
        x.shape != (t, d)
        or weights.shape != (t, k)
        or w13.shape != (e, 2 * inter, d // 2)
        or w13_sz.shape != (e, d // group, 2 * inter, 2)
        or w2_sz.shape != (e, inter // group, d, 2)
    ):
        raise ValueError(
            f"shapes do not fit: x {tuple(x.shape)}, weights {tuple(weights.shape)}, ids {(t, k)}, "
            f"w13 {tuple(w13.shape)}, w13_sz {tuple(w13_sz.shape)}, w2 {tuple(w2.shape)}, "
            f"w2_sz {tuple(w2_sz.shape)}, group {group}"
        )
    if not int4_shapes_supported(d, inter, group):
        raise ValueError(
            f"INT4 experts of hidden {d}, intermediate {inter}, group {group}: not this kernel's tiles"
        )
    return t, k, e, d, inter


@_native_op("moe_int4" + _INT4_ARGS)
def moe_int4(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w13_sz: torch.Tensor,
    w2: torch.Tensor,
    w2_sz: torch.Tensor,
    group: int,
) -> torch.Tensor:
    """`compiled_gemv.gathered_experts_int4_torch` in one call: x [T, D] bf16, routing weights fp32 /
    ids int64 [T, k], INT4 experts in torch's CPU tiles (`RoutedExperts` "cpu" layout): w13 uint8
    [E, 2I, D/2] with w13_sz bf16 [E, D/group, 2I, 2], w2 [E, D, I/2] with w2_sz [E, I/group, D, 2]."""
    t, k, e, d, inter = _int4_sizes(x, weights, ids, w13, w13_sz, w2, w2_sz, group)
    xf, acc = torch.empty(t, d), torch.empty(t, d)
    act = torch.empty(t * k, inter)
    out = torch.empty_like(x)
    tensors = (x, ids, weights, w13, w13_sz, w2, w2_sz, xf, act, acc, out)
    _refuse_bad_id(_lib().k2_moe_int4(*map(_ptr, tensors), t, k, d, inter, e, group), ids, e)
    return out


@_native_op("moe_int4_grouped" + _INT4_ARGS)
def moe_int4_grouped(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w13_sz: torch.Tensor,
    w2: torch.Tensor,
    w2_sz: torch.Tensor,
    group: int,
) -> torch.Tensor:
    """`moe_int4`'s result bit for bit, with the work grouped by expert: each routed expert's tiles are
    read and unpacked once for all the rows routed to it, up to four rows per read."""
    t, k, e, d, inter = _int4_sizes(x, weights, ids, w13, w13_sz, w2, w2_sz, group)
    rows = t * k
    xf, act, yw = torch.empty(t, d), torch.empty(rows, inter), torch.empty(rows, d)
    order, start = torch.empty(rows, dtype=torch.int32), torch.empty(e + 1, dtype=torch.int32)
    xs, used = torch.empty(rows, dtype=torch.int64), torch.empty(e, dtype=torch.int32)
    out = torch.empty_like(x)
    tensors = (x, ids, weights, w13, w13_sz, w2, w2_sz, xf, act, yw, order, start, xs, used, out)
    _refuse_bad_id(_lib().k2_moe_int4_grouped(*map(_ptr, tensors), t, k, d, inter, e, group), ids, e)
    return out


@_native_op("linear_int4(Tensor x, Tensor w, Tensor sz, int group) -> Tensor")
def linear_int4(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """x [T, K] bf16 @ W.T -> [T, N] bf16 for an INT4 weight W [N, K] in torch's CPU tiles (w uint8
    [N, K/2], sz bf16 [K/group, N, 2]: what `aten._weight_int4pack_mm_for_cpu(x, w, group, sz)` takes),
    each output the fp32 sum rounded once (`int4_tiles_supported(N, K)`, K a multiple of `group`)."""
    _check("x", x, torch.bfloat16, 2)
    _check("w", w, torch.uint8, 2)
    _check("sz", sz, torch.bfloat16, 3)
    t, k = x.shape
    n = w.shape[0]
    if (n, k, group, *sz.shape) not in _int4_linear_shapes:  # checked once per shape (~50 calls a step)
        if w.shape[1] * 2 != k or group <= 0 or k % group or sz.shape != (k // group, n, 2):
            raise ValueError(
                f"shapes do not fit: x {tuple(x.shape)}, w {tuple(w.shape)}, sz {tuple(sz.shape)}, group {group}"
            )
        if not int4_tiles_supported(n, k):
            raise ValueError(f"an INT4 weight of {n} x {k}: not this kernel's tiles (blocks of 64 rows)")
        _int4_linear_shapes.add((n, k, group, *sz.shape))
    y = x.new_empty(t, n)
    if _lib().k2_linear_int4(_ptr(x), _ptr(w), _ptr(sz), _ptr(y), t, n, k, group):
        raise MemoryError(f"linear_int4: no memory for {t} x {k} fp32 inputs")
    return y


_int4_linear_shapes: set[tuple[int, ...]] = set()


@torch.library.register_fake("k2serve::linear_int4", lib=_LIB)
def _linear_int4_shape(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@_native_op("dequant_int4(Tensor w, Tensor sz, int group) -> Tensor")
def dequant_int4(w: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """The dense bf16 weight of an INT4 one W [N, K] in torch's CPU tiles (w uint8 [N, K/2], sz bf16
    [K/group, N, 2]), transposed: [K, N] (`F.linear(x, out.t())`), W = (q - 8) * scale + zero in fp32
    rounded to bf16 (`int4_tiles_supported`)."""
    _check("w", w, torch.uint8, 2)
    _check("sz", sz, torch.bfloat16, 3)
    n, k = w.shape[0], w.shape[1] * 2
    if group <= 0 or k % group or sz.shape != (k // group, n, 2):
        raise ValueError(f"shapes do not fit: w {tuple(w.shape)}, sz {tuple(sz.shape)}, group {group}")
    if not int4_tiles_supported(n, k):
        raise ValueError(f"an INT4 weight of {n} x {k}: not this kernel's tiles (blocks of 64 rows)")
    out = torch.empty(k, n, dtype=torch.bfloat16)
    _lib().k2_dequant_int4(_ptr(w), _ptr(sz), _ptr(out), n, k, group)
    return out


@torch.library.register_fake("k2serve::dequant_int4", lib=_LIB)
def _dequant_int4_shape(w: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    return sz.new_empty(w.shape[1] * 2, w.shape[0])


@_native_op(
    "mla_decode(Tensor q_nope, Tensor q_pe, Tensor kv, int layer, Tensor block_tables, Tensor positions, "
    "Tensor wkv, float scale) -> Tensor"
)
def mla_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    positions: torch.Tensor,
    wkv: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The captured decode step's absorbed MLA attention for one layer (`captured.StaticDecodeAttention`
    in bf16): q_nope [B, H, dn] and q_pe [B, H, dr] bf16, the latent pool kv [layers, blocks, bs, C + dr]
    bf16 read at `layer` through block_tables [B, NB] int64 up to positions [B] int64 (each row's keys
    0..position), wkv = kv_b_proj's weight [H * (dn + dv), C] bf16 (W_UK and W_UV per head) -> [B, H, dv]
    bf16, with the torch code's roundings."""
    _check("q_nope", q_nope, torch.bfloat16, 3)
    _check("q_pe", q_pe, torch.bfloat16, 3)
    _check("kv", kv, torch.bfloat16, 4)
    _check("block_tables", block_tables, torch.int64, 2)
    _check("positions", positions, torch.int64, 1)
    _check("wkv", wkv, torch.bfloat16, 2)
    b, h, dn = q_nope.shape
    dr = q_pe.shape[2]
    layers, blocks, bs, width = kv.shape
    c = width - dr
    nb = block_tables.shape[1]
    dv = wkv.shape[0] // h - dn
    if (
        q_pe.shape[:2] != (b, h)
        or positions.shape != (b,)
        or block_tables.shape[0] != b
        or wkv.shape != (h * (dn + dv), c)
        or dv <= 0
        or c % 16
        or not 0 <= layer < layers
    ):
        raise ValueError(
            f"shapes do not fit: q_nope {tuple(q_nope.shape)}, q_pe {tuple(q_pe.shape)}, kv {tuple(kv.shape)} "
            f"(layer {layer}), block_tables {tuple(block_tables.shape)}, positions {tuple(positions.shape)}, "
            f"wkv {tuple(wkv.shape)}"
        )
    scratch = torch.empty(b * h, nb * bs)
    out = q_nope.new_empty(b, h, dv)
    at_layer = kv.data_ptr() + layer * blocks * bs * width * kv.element_size()
    tensors = (q_nope, q_pe)
    bad = _lib().k2_mla_decode(
        *map(_ptr, tensors), at_layer, *map(_ptr, (block_tables, positions, wkv)), scale, _ptr(scratch),
        _ptr(out), b, h, dn, dr, c, dv, nb, bs, blocks
    )  # fmt: skip
    if bad:
        raise ValueError(
            f"row {bad - 1}: position {int(positions[bad - 1])} or its block table entries fall outside "
            f"the {nb} x {bs} table / the pool's {blocks} blocks"
        )
    return out


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
