"""bf16 linear layers through oneDNN on prepacked weights (model/cpu_linear.py): the same outputs as
`F.linear`, the same greedy tokens as the model without them, a repack when the weight changes, the plain
path where it must stay; and the INT4 fused kernel against the dequantised reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from k2serve.bench.cpu_gemv import K2_SHAPES, layer_shapes, path_calls, weight_bytes
from k2serve.config import ModelConfig
from k2serve.model import cpu_kernels, cpu_linear
from k2serve.model.checkpoint import write_checkpoint
from k2serve.model.cpu_linear import PrepackedLinear, prepack_linears, prepack_supported
from k2serve.model.loader import load_model
from k2serve.model.presets import PRESETS

needs_prepack = pytest.mark.skipif(not prepack_supported(), reason="no oneDNN bf16 on this CPU/torch")
SMALL = ModelConfig.from_dict(PRESETS["small"])


def packed_linear(out_f: int, in_f: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(torch.bfloat16)
    assert prepack_linears(lin) == 1
    return lin


K2_NARROW = {
    "k2.q_b_proj": (12288, 1536),
    "k2.kv_b_proj": (16384, 512),
    "k2.expert_w2": K2_SHAPES["expert_w2"],
}
ALL_SHAPES = {f"small.{k}": v for k, v in layer_shapes(SMALL).items()} | K2_NARROW | {"k_4096": (1024, 4096)}


@needs_prepack
@pytest.mark.parametrize("name", sorted(ALL_SHAPES))
def test_prepacked_equals_f_linear_bitwise_up_to_max_rows(name: str) -> None:
    """The packed path on every linear shape of `small` and K2's with at most PREPACK_MAX_IN inputs, at 1 to
    PREPACK_MAX_ROWS rows: F.linear's outputs bit for bit (what keeps a bf16 model's tokens unchanged)."""
    out_f, in_f = ALL_SHAPES[name]
    lin = packed_linear(out_f, in_f)
    for batch in (1, 3, 8, 32):  # 32: the most rows PREPACK_MAX_ROWS may be raised to
        assert cpu_linear.PREPACK_MAX_ROWS <= 32
        x = torch.randn(batch, in_f, dtype=torch.bfloat16)
        with torch.inference_mode():
            ref = F.linear(x, lin.weight)
            y = torch.ops.mkldnn._linear_pointwise(x, lin.packed_weight(), None, "none", [None], "")
            if batch <= cpu_linear.PREPACK_MAX_ROWS:
                assert lin.uses_packed(x)
                torch.testing.assert_close(lin(x), y, rtol=0, atol=0)
        assert isinstance(lin, PrepackedLinear) and lin.packed is not None  # the packed path ran
        assert y.dtype == torch.bfloat16 and y.shape == ref.shape
        assert torch.equal(y, ref), (name, batch, float((y.float() - ref.float()).abs().max()))


@pytest.mark.parametrize("name", ["q_a_proj", "kv_a_proj", "expert_w13"])
def test_k2_hidden_size_inputs_stay_on_f_linear(name: str) -> None:
    """K2's 7168-input layers, where oneDNN's packed sum is a bf16 ulp off F.linear's, are not switched."""
    out_f, in_f = K2_SHAPES[name]
    assert in_f > cpu_linear.PREPACK_MAX_IN
    lin = nn.Linear(in_f, out_f, bias=False, device="meta", dtype=torch.bfloat16).to_empty(device="cpu")
    assert prepack_linears(lin) == 0 and type(lin) is nn.Linear


@needs_prepack
def test_more_rows_than_the_limit_keep_f_linear() -> None:
    """Calls of more than PREPACK_MAX_ROWS rows (prefill chunks, big decode batches) stay on F.linear and
    never pack (from 48 rows oneDNN's packed kernel sums in another order: a bf16 ulp apart)."""
    lin = packed_linear(384, 1024)
    x = torch.randn(cpu_linear.PREPACK_MAX_ROWS + 1, 1024, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert not lin.uses_packed(x)
        y = lin(x)
    assert lin.packed is None and torch.equal(y, F.linear(x, lin.weight))


@needs_prepack
def test_prepacked_keeps_leading_dims_and_bias() -> None:
    lin = packed_linear(48, 64, bias=True)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        y = lin(x)
    ref = F.linear(x, lin.weight, lin.bias)
    assert y.shape == (2, 5, 48)
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2)
    assert (y.float() - F.linear(x.float(), lin.weight.float(), lin.bias.float())).abs().max() < 0.05


@needs_prepack
def test_weight_change_repacks() -> None:
    lin = packed_linear(32, 64)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        before = lin(x)
    with torch.no_grad():
        lin.weight.mul_(-2)
    with torch.inference_mode():
        after = lin(x)
    torch.testing.assert_close(after, F.linear(x, lin.weight.detach()), rtol=0, atol=0)
    assert not torch.equal(after, before)


@needs_prepack
def test_plain_path_for_fp32_input_and_autograd() -> None:
    lin = packed_linear(16, 32)
    x32 = torch.randn(2, 32)
    with pytest.raises(RuntimeError, match="dtype"):
        lin(x32)  # a bf16 weight with an fp32 input: F.linear's own error, not a silent cast
    lin.weight.requires_grad_(True)
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    y = lin(x)
    y.float().sum().backward()
    assert lin.weight.grad is not None and lin.packed is None  # autograd never took the packed path


def test_fp32_and_disabled_models_are_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    assert prepack_linears(nn.Sequential(nn.Linear(8, 8))) == 0  # fp32 stays on F.linear
    monkeypatch.setattr(cpu_linear, "ENABLED", False)
    assert prepack_linears(nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16))) == 0


@needs_prepack
def test_bf16_model_same_greedy_tokens_with_and_without_prepacking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_model prepacks a bf16 model's linears; its logits equal those of the same model on F.linear."""
    ckpt = write_checkpoint(tmp_path / "m", "tiny", seed=3, dtype=torch.bfloat16)
    packed = load_model(ckpt, torch.bfloat16)
    monkeypatch.setattr(cpu_linear, "ENABLED", False)
    plain = load_model(ckpt, torch.bfloat16)
    n_packed = sum(isinstance(m, PrepackedLinear) for m in packed.modules())
    assert n_packed > 0 and not any(isinstance(m, PrepackedLinear) for m in plain.modules())
    gen = torch.Generator().manual_seed(0)
    for shape in ((1, 6), (2, 12)):  # 6 rows: the packed path; 24: above PREPACK_MAX_ROWS, F.linear
        ids = torch.randint(0, 1000, shape, generator=gen)
        with torch.inference_mode():
            a, b = packed(ids), plain(ids)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        if shape == (1, 6):
            assert isinstance(packed.lm_head, PrepackedLinear) and packed.lm_head.packed is not None


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="no CPU int4 kernel")
@pytest.mark.parametrize("batch", [1, 8])
def test_bench_paths_compute_their_stated_weights(batch: int) -> None:
    """Each path of `bench cpu-gemv` computes x @ W.T for the dense weight it reports (int8/int4: the
    quantised weights; int4 is the INT4 experts' fused kernel against the dequantised group-32
    reference) within bf16 rounding of the output, and the quantised weights stay near the original."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 512, generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(batch, 512, generator=g).to(torch.bfloat16)
    paths = ("bf16", "fp32", "int8", "int4") + (("mkldnn",) if prepack_supported() else ())
    paths += ("native",) if cpu_kernels.available() else ()
    calls = path_calls(w, x, paths)
    assert set(calls) == set(paths)
    for path, (call, dense) in calls.items():
        ref = x.float() @ dense.t()
        y = call().float()
        assert y.shape == (batch, 256), path
        err = (y - ref).abs().max() / ref.abs().max()
        assert err < 1e-2, (path, float(err))  # bf16 output rounding: 2**-8 relative
        rel_w = (dense - w.float()).norm() / w.float().norm()
        assert rel_w < {"int8": 0.01, "int4": 0.2}.get(path, 1e-6), (path, float(rel_w))


def test_weight_bytes_and_shapes() -> None:
    assert weight_bytes("bf16", 512, 1024) == 2 * 512 * 1024
    assert weight_bytes("int4", 512, 1024) == 512 * 512 + 4 * 512 * 32
    assert layer_shapes(SMALL)["expert_w13"] == (512, 1024)
    assert K2_SHAPES["expert_w2"] == (7168, 2048)


@needs_prepack
def test_set_prepacked_switches_both_ways_and_keeps_outputs() -> None:
    from k2serve.model.cpu_linear import set_prepacked

    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16)).to(torch.bfloat16)
    assert prepack_linears(model) == 2
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        on = model(x)
        assert set_prepacked(model, False) == 2 and all(type(m) is nn.Linear for m in model)
        off = model(x)
        assert set_prepacked(model, True) == 2 and all(type(m) is PrepackedLinear for m in model)
    torch.testing.assert_close(on, off, rtol=0, atol=0)
    assert set_prepacked(nn.Sequential(nn.Linear(4, 4)), True) == 0  # never prepacked: left alone


@needs_prepack
def test_compiles_as_a_plain_linear() -> None:
    """Under torch.compile (a captured step) the layer traces as `F.linear` on its dense weight, whole graph,
    and gives the eager prepacked output (Inductor then prepacks by itself under freezing; the Inductor
    backend gave the same bitwise result by hand, 3 minutes of compiling on the loaded host)."""
    model = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 32)).to(torch.bfloat16)
    prepack_linears(model)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = model(x)
        torch._dynamo.reset()
        y = torch.compile(model, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


@needs_prepack
def test_captured_step_traces_the_packed_kernel_when_asked() -> None:
    """Inside a captured step (`compiled_gemv.options(True)`) the layer traces as the opaque packed op on
    the copy packed by an eager call, bit for bit the eager output; the option is guarded (on and off keep
    their own graphs), and a weight changed in place is read after `packed_weight()` repacks it."""
    from k2serve.model import compiled_gemv
    from k2serve.model.cpu_linear import packed_layers

    model = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 32)).to(torch.bfloat16)
    prepack_linears(model)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    graphs: list[str] = []

    def record(gm: torch.fx.GraphModule, _: Any) -> Any:
        graphs.append(gm.code)
        return gm.forward

    with torch.inference_mode():
        ref = model(x)  # packs both layers
        assert len(packed_layers(model)) == 2
        torch._dynamo.reset()
        step = torch.compile(model, backend=record, fullgraph=True, dynamic=False)
        with compiled_gemv.options(True):
            on = step(x)
        with compiled_gemv.options(False):
            off = step(x)
        assert ["packed_linear" in g for g in graphs] == [True, False]
        torch.testing.assert_close(on, ref, rtol=0, atol=0)
        torch.testing.assert_close(off, ref, rtol=0, atol=0)  # F.linear: bitwise within the limits
        model[0].weight.mul_(2)
        for layer in packed_layers(model):
            layer.packed_weight()
        with compiled_gemv.options(True):
            changed = step(x)
        assert len(graphs) == 2  # no retrace: the new packed copy is an input of the same graph
        torch.testing.assert_close(changed, model(x), rtol=0, atol=0)
        assert not torch.equal(changed, on)
