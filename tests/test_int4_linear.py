"""INT4 weight-only linear layers (model/int4_linear.py) and their native kernels (`k2serve::linear_int4`,
`k2serve::dequant_int4`): a checkpoint with every linear layer pack-quantized ("int4-all") loads its
layers as `Int4Linear` in torch's CPU tiles and computes what the dequantised checkpoint's dense model
computes (fp32: bit for bit, layer by layer; bf16: within a rounding step); the kernels against torch's
fused INT4 kernel and the dequantised weight on `small`'s, `moe200m`'s and K2's shapes; the path taken
by rows; bad input refused; the ops' registrations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import dequantized_copy
from torch import nn

from k2serve.model import cpu_kernels, int4_linear
from k2serve.model.int4_linear import Int4Linear
from k2serve.model.loader import load_model
from k2serve.model.quant import dequantize_int4, pack_int4, quantize_int4
from k2serve.model.safetensors_io import SafetensorsReader

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(), reason=f"native CPU kernels unavailable: {cpu_kernels.unavailable_reason()}"
)


@pytest.fixture(scope="module")
def int4_all_ckpt(tiny_int4_all_ckpt: Path) -> Path:
    return tiny_int4_all_ckpt


@pytest.fixture(scope="module")
def int4_all_dense_ckpt(int4_all_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dequantized_copy(int4_all_ckpt, tmp_path_factory.mktemp("tiny_int4_all_dense") / "ckpt")


def random_layer(out_f: int, in_f: int, dtype: torch.dtype, seed: int = 0) -> tuple[Int4Linear, torch.Tensor]:
    """An `Int4Linear` of a random weight quantised as the checkpoints are, and the dense weight [out, in]
    (fp32) its INT4 form dequantises to."""
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_int4(torch.randn(out_f, in_f, generator=g) * in_f**-0.5, group_size=32)
    packed, scale = pack_int4(q), scale.to(torch.bfloat16)
    layer = Int4Linear(in_f, out_f, 32, dtype)
    layer.set_packed(packed, scale)
    return layer, dequantize_int4(packed, scale, torch.float32)


def test_int4_all_checkpoint_stores_every_linear_but_the_router_packed(int4_all_ckpt: Path) -> None:
    names: set[str] = set()
    for shard in int4_all_ckpt.glob("*.safetensors"):
        reader = SafetensorsReader(shard)
        names |= set(reader.entries)
        reader.close()
    assert "lm_head.weight_packed" in names and "lm_head.weight" not in names
    for layer in range(3):
        p = f"model.layers.{layer}."
        assert p + "self_attn.kv_b_proj.weight_packed" in names
        assert p + "self_attn.o_proj.weight_packed" in names
    assert "model.layers.1.mlp.gate.weight" in names  # the router stays dense
    assert not [n for n in names if n.endswith("proj.weight")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_all_model_holds_int4_layers_and_equals_the_dequantised_model(
    int4_all_ckpt: Path, int4_all_dense_ckpt: Path, dtype: torch.dtype
) -> None:
    """Loaded in the CPU layout, every linear layer whose rows come in blocks of 64 is an `Int4Linear`
    (kv_b_proj, read as a weight by the absorbed attention, and tiny's 80-row kv_a_proj_with_mqa are
    dequantised into dense layers); each computes its dense counterpart's output (fp32: bit for bit; bf16:
    within a bf16 step of the exact sum), and the models' logits agree (fp32: within the INT4 experts'
    tolerance, as test_checkpoint's INT4-experts model does; bf16: the same greedy tokens)."""
    packed = load_model(int4_all_ckpt, dtype, int4_layout="cpu")
    dense = load_model(int4_all_dense_ckpt, dtype)
    ct = load_model(int4_all_ckpt, dtype, int4_layout="ct")
    held = {n for n, m in packed.named_modules() if isinstance(m, Int4Linear)}
    assert not any(isinstance(m, Int4Linear) for m in ct.modules())
    want = {"lm_head"}
    for i in range(3):
        want |= {f"layers.{i}.self_attn.{p}" for p in ("q_a_proj", "q_b_proj", "o_proj")}
        mlp = "mlp" if i == 0 else "mlp.shared_experts"
        want |= {f"layers.{i}.{mlp}.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert held == want
    x_gen = torch.Generator().manual_seed(1)
    for name in sorted(held):
        layer = packed.get_submodule(name)
        assert (
            isinstance(layer, Int4Linear) and layer.w_i4.numel() * 2 == layer.in_features * layer.out_features
        )
        w = dense.get_submodule(name).weight
        x = torch.randn(3, 5, layer.in_features, generator=x_gen).to(dtype)
        got = layer(x)
        assert got.shape == (3, 5, layer.out_features) and got.dtype == dtype
        if dtype == torch.float32:
            assert torch.equal(got, F.linear(x, w)), name
        else:
            exact = x.float() @ w.float().t()
            step = exact.abs().amax(-1, keepdim=True) * 2**-7
            assert ((got.float() - exact).abs() <= step).all(), name
    ids = torch.randint(0, packed.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b, c = packed(ids), dense(ids), ct(ids)
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-4)
    else:
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
        assert (c.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


# (out, in): `small`'s q_a / o_proj / dense gate / lm_head, `moe200m`'s shared expert, K2's q_a_proj and
# kv_a_proj_with_mqa (576 = 9 blocks of 64)
KERNEL_SHAPES = [(384, 1024), (1024, 512), (2816, 1024), (32256, 1024), (128, 768), (1536, 7168), (576, 7168)]


@needs_kernels
@pytest.mark.parametrize(("out_f", "in_f"), KERNEL_SHAPES)
def test_linear_int4_kernel_matches_torchs_fused_kernel(out_f: int, in_f: int) -> None:
    """`k2serve::linear_int4` against `aten._weight_int4pack_mm_for_cpu` on the same tiles at 1-9 rows:
    each output within a bf16 step of the exact product with the dequantised weight, as torch's is, and
    nearly all bit for bit equal to torch's."""
    if not cpu_kernels.int4_tiles_supported(out_f, in_f):
        pytest.skip("torch packs INT4 in other tiles on this CPU (not AVX512's)")
    layer, w = random_layer(out_f, in_f, torch.bfloat16, seed=out_f)
    equal = total = 0
    for rows in (1, 2, 3, 4, 5, 9):
        x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows)).bfloat16()
        got = cpu_kernels.linear_int4(x, layer.w_i4, layer.w_sz, 32)
        theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.w_i4, 32, layer.w_sz)
        exact = x.float() @ w.t()
        step = exact.abs().amax(-1, keepdim=True) * 2**-7
        assert ((got.float() - exact).abs() <= step).all()
        equal += int((got == theirs).sum())
        total += got.numel()
    assert equal / total > 0.99


@needs_kernels
@pytest.mark.parametrize(("out_f", "in_f"), [(384, 1024), (1024, 256), (64, 64)])
def test_dequant_int4_kernel_is_the_dequantised_weight(out_f: int, in_f: int) -> None:
    """`k2serve::dequant_int4` gives bit for bit the bf16 weight the compressed-tensors form dequantises
    to (as `quant.dequantize_int4` makes it), transposed."""
    if not cpu_kernels.int4_tiles_supported(out_f, in_f):
        pytest.skip("torch packs INT4 in other tiles on this CPU (not AVX512's)")
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-8, 8, (out_f, in_f), generator=g, dtype=torch.int8)  # the whole 4-bit range
    scale = ((torch.rand(out_f, in_f // 32, generator=g) + 0.5) / 100).bfloat16()
    layer = Int4Linear(in_f, out_f, 32, torch.bfloat16)
    layer.set_packed(pack_int4(q), scale)
    got = cpu_kernels.dequant_int4(layer.w_i4, layer.w_sz, 32)
    assert got.shape == (in_f, out_f)
    assert torch.equal(got, dequantize_int4(pack_int4(q), scale, torch.bfloat16).t())
    assert torch.equal(layer.dequantized(), dequantize_int4(pack_int4(q), scale, torch.bfloat16))


@pytest.mark.parametrize("native", [True, False])
def test_int4_linear_paths_by_rows(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """A bf16 `Int4Linear` runs the fused INT4 GEMV up to `KERNEL_MAX_ROWS` rows (the native kernel, or
    torch's where the native kernels do not run) and dequantises the weight for one F.linear past it; a
    layer of `LARGE_WEIGHTS` or more keeps the GEMV to `KERNEL_MAX_ROWS_LARGE`. Every path within a bf16
    step of the exact product."""
    if native and not cpu_kernels.available():
        pytest.skip(f"native CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    if not native:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    monkeypatch.setattr(int4_linear, "LARGE_WEIGHTS", 256 * 512)
    calls: list[str] = []
    for name in ("linear_int4", "dequant_int4"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(
            cpu_kernels, name, lambda *a, real=real, name=name: calls.append(name) or real(*a)
        )
    fused = torch.ops.aten._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(
        torch.ops.aten,
        "_weight_int4pack_mm_for_cpu",
        lambda *a: calls.append("aten") or fused(*a),
        raising=False,
    )
    small, w_small = random_layer(128, 256, torch.bfloat16, seed=1)
    large, w_large = random_layer(256, 512, torch.bfloat16, seed=2)
    kernel = "linear_int4" if native else "aten"
    for layer, w, rows, path in (
        (small, w_small, 1, kernel),
        (small, w_small, int4_linear.KERNEL_MAX_ROWS, kernel),
        (small, w_small, int4_linear.KERNEL_MAX_ROWS + 1, "dequant_int4" if native else None),
        (large, w_large, int4_linear.KERNEL_MAX_ROWS_LARGE, kernel),
        (large, w_large, int4_linear.KERNEL_MAX_ROWS_LARGE + 1, "dequant_int4" if native else None),
    ):
        calls.clear()
        x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows)).bfloat16()
        got = layer(x)
        assert calls == ([path] if path else []), (rows, calls)
        exact = x.float() @ w.t()
        assert ((got.float() - exact).abs() <= exact.abs().amax(-1, keepdim=True) * 2**-7).all()


@needs_kernels
def test_int4_kernels_refuse_bad_input() -> None:
    layer, _ = random_layer(128, 256, torch.bfloat16)
    x = torch.randn(2, 256).bfloat16()
    with pytest.raises(ValueError, match="x must be a contiguous 2-d torch.bfloat16"):
        cpu_kernels.linear_int4(x.float(), layer.w_i4, layer.w_sz, 32)
    with pytest.raises(ValueError, match="shapes do not fit"):
        cpu_kernels.linear_int4(torch.randn(2, 128).bfloat16(), layer.w_i4, layer.w_sz, 32)
    with pytest.raises(ValueError, match="shapes do not fit"):
        cpu_kernels.dequant_int4(layer.w_i4, layer.w_sz, 64)
    odd = torch.zeros(96, 128, dtype=torch.uint8)  # 96 rows: not whole blocks of 64
    with pytest.raises(ValueError, match="96 x 256: not this kernel's tiles"):
        cpu_kernels.linear_int4(x, odd, torch.zeros(8, 96, 2, dtype=torch.bfloat16), 32)
    with pytest.raises(ValueError, match="not supported"):
        Int4Linear(256, 96, 32, torch.bfloat16)
    with pytest.raises(TypeError, match="holds torch.bfloat16 scales; input is torch.float32"):
        layer(x.float())


@needs_kernels
def test_int4_linear_ops_pass_opcheck() -> None:
    layer, _ = random_layer(128, 256, torch.bfloat16)
    x = torch.randn(3, 256).bfloat16()
    torch.library.opcheck(torch.ops.k2serve.linear_int4.default, (x, layer.w_i4, layer.w_sz, 32))
    torch.library.opcheck(torch.ops.k2serve.dequant_int4.default, (layer.w_i4, layer.w_sz, 32))


def test_int4_linear_names_leave_kv_b_proj_and_the_router_dense() -> None:
    model = nn.Module()
    model.attn = nn.Module()
    model.attn.q_a_proj = nn.Linear(64, 64, bias=False)
    model.attn.kv_b_proj = nn.Linear(64, 64, bias=False)
    model.lm_head = nn.Linear(64, 64, bias=False)
    assert int4_linear.int4_linear_names(model) == {"attn.q_a_proj", "lm_head"}
