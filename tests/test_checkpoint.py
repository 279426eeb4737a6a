"""Checkpoint formats: INT4 pack-quantized experts, FP8 block weights, expert subsets, bad checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from k2serve.bench import int4_experts as int4_experts_bench
from k2serve.config import ModelConfig
from k2serve.model import moe
from k2serve.model.checkpoint import write_checkpoint
from k2serve.model.loader import CheckpointError, load_model
from k2serve.model.moe import RoutedExperts
from k2serve.model.presets import PRESETS
from k2serve.model.quant import (
    dequantize_fp8_block,
    dequantize_int4,
    dequantize_int4pack_cpu,
    int4pack_cpu_tiles,
    pack_int4,
    quantize_fp8_block,
    quantize_int4,
    unpack_int4,
)
from tests.conftest import dequantized_copy


def test_int4_pack_unpack_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (24, 64), generator=g, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (24, 8)
    assert torch.equal(unpack_int4(packed), q)
    # Layout: value j of a word sits at bits 4j..4j+3, stored as q + 8.
    word = int(packed[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * j)) & 0xF for j in range(8)] == (q[0, :8].int() + 8).tolist()


def test_int4_quantize_dequantize_error_bounded() -> None:
    w = torch.randn(16, 128)
    q, scale = quantize_int4(w, 32)
    assert int(q.abs().max()) <= 7
    w2 = dequantize_int4(pack_int4(q), scale)
    # Symmetric rounding: error at most half a step per group.
    step = scale.repeat_interleave(32, dim=1)
    assert bool(((w - w2).abs() <= step / 2 + 1e-6).all())


def test_fp8_block_round_trip() -> None:
    w = torch.randn(200, 300)
    wq, s = quantize_fp8_block(w)
    assert wq.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    w2 = dequantize_fp8_block(wq, s)
    assert ((w - w2).abs() / w.abs().clamp_min(1e-3)).median() < 0.05


@pytest.mark.parametrize(
    ("layout", "dense_min_rows"),
    [("ct", None), ("cpu", 1), ("cpu", 16), ("cpu", 10**9)],  # "cpu": all dense, mixed, all fused
)
def test_int4_model_equals_dequantized_model(
    tiny_int4_ckpt: Path,
    tiny_int4_dequantized_ckpt: Path,
    int4_expert_rows: dict[str, list[int]],
    monkeypatch: pytest.MonkeyPatch,
    layout: str,
    dense_min_rows: int | None,
) -> None:
    if dense_min_rows is not None:
        monkeypatch.setitem(moe.INT4_DENSE_MIN_ROWS, torch.float32, dense_min_rows)
    packed = load_model(tiny_int4_ckpt, torch.float32, int4_layout=layout)
    experts = packed.layers[1].mlp.experts
    assert experts.int4_group_size == 32 and experts.int4_layout == layout
    held = {n: b for n, b in experts.named_buffers() if n != "global_to_local"}
    assert not hasattr(experts, "w13")  # never expanded: 4 bits per weight plus one scale per 32
    n_weights = experts.num_local * 3 * experts.hidden * experts.inter
    packed_bytes = sum(
        b.numel() * b.element_size() for n, b in held.items() if not n.endswith(("_scale", "_sz"))
    )
    assert packed_bytes == n_weights // 2
    dense = load_model(tiny_int4_dequantized_ckpt, torch.float32)
    ids = torch.randint(0, packed.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = packed(ids), dense(ids)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert held.keys() == {n for n, _ in experts.named_buffers() if n != "global_to_local"}  # no cache
    fused, dequantized = int4_expert_rows["fused"], int4_expert_rows["dense"]
    if layout == "ct":  # dequantised per call, always
        assert not fused and dequantized
    else:
        assert all(n < dense_min_rows for n in fused) and all(n >= dense_min_rows for n in dequantized)
        both = {1: (False, True), 16: (True, True), 10**9: (True, False)}[dense_min_rows]
        assert (bool(fused), bool(dequantized)) == both


def random_int4_weight(
    out_f: int, in_f: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int32 [out, in/8], scale [out, in/32] in `dtype`): values over the whole INT4 range,
    scales of a trained model's size (weights up to ~0.1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (out_f, in_f), generator=g, dtype=torch.int8)
    scale = ((torch.rand(out_f, in_f // 32, generator=g) + 0.5) / 100).to(dtype)
    return pack_int4(q), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 128), (128, 64), (512, 1024), (1024, 256), (32, 64), (48, 64)])
def test_int4_cpu_tiles_dequantize_to_the_kernels_weights(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """Unpacking torch's CPU int4 tiles gives bitwise the weights the fused kernel multiplies with
    (its product with the identity) and those of the compressed-tensors form. Shapes: tiny's and
    small's experts, and two that are one partial block (AVX512: row pairs, the gather path)."""
    out_f, in_f = shape
    tiles = int4pack_cpu_tiles(out_f, in_f)
    if tiles is None:
        assert shape in ((32, 64), (48, 64)), "tiny's and small's expert shapes must be readable"
        pytest.skip(f"{shape}: tiles this CPU capability lays out otherwise, left to the fused kernel")
    packed, scale = random_int4_weight(out_f, in_f, dtype, seed=out_f + in_f)
    cpu = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).to(torch.int32) + 8, 2)
    scale_zero = torch.stack((scale.t(), torch.zeros_like(scale.t())), dim=-1).contiguous()  # [in/32, out, 2]
    got = dequantize_int4pack_cpu(cpu, scale.t(), tiles, dtype)  # [in, out]
    assert got.dtype == dtype and got.shape == (in_f, out_f)
    assert torch.equal(got, dequantize_int4(packed, scale, dtype).t())
    eye = torch.eye(in_f, dtype=dtype)
    assert torch.equal(got, torch.ops.aten._weight_int4pack_mm_for_cpu(eye, cpu, 32, scale_zero))


def tiny_int4_experts(dtype: torch.dtype, n_experts: int) -> tuple[RoutedExperts, RoutedExperts]:
    """The same random INT4 experts of the tiny preset's shape twice: in torch's CPU int4 tiles, and
    dequantised into dense fp32 experts (the reference)."""
    config = ModelConfig.from_dict(PRESETS["tiny"])
    ids = list(range(n_experts))
    packed = RoutedExperts(config, ids, int4_group_size=32, dtype=dtype, int4_layout="cpu")
    dense = RoutedExperts(config, ids, dtype=torch.float32)
    d, i = config.hidden_size, config.moe_intermediate_size
    for e in ids:
        w13 = random_int4_weight(2 * i, d, dtype, seed=2 * e)
        w2 = random_int4_weight(d, i, dtype, seed=2 * e + 1)
        packed.set_int4_expert(e, *w13, *w2)
        dense.w13[e] = dequantize_int4(*w13, torch.float32)
        dense.w2[e] = dequantize_int4(*w2, torch.float32)
    return packed, dense


def assert_rows_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """Every element within `tol` times the largest magnitude of its row of `want`."""
    err = (got.float() - want.float()).abs() / want.float().abs().amax(dim=1, keepdim=True)
    assert float(err.max()) <= tol, f"max error {float(err.max()):.2e} of the row's largest value"


@pytest.mark.parametrize(
    ("dtype", "dense_min_rows"),
    [(torch.bfloat16, None), (torch.float32, 12)],  # bf16's threshold as measured; fp32's is 1
)
def test_int4_experts_fused_below_threshold_dense_from_it(
    int4_expert_rows: dict[str, list[int]],
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    dense_min_rows: int | None,
) -> None:
    """Rows per expert on both sides of INT4_DENSE_MIN_ROWS: each expert takes its path, and every
    row equals the dequantised experts' (fp32: up to summation order; bf16: up to bf16 rounding)."""
    if dense_min_rows is not None:
        monkeypatch.setitem(moe.INT4_DENSE_MIN_ROWS, dtype, dense_min_rows)
    t = moe.INT4_DENSE_MIN_ROWS[dtype]
    counts = [1, t - 1, t, t + 9]
    packed, dense = tiny_int4_experts(dtype, len(counts))
    x = torch.randn(sum(counts), packed.hidden, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = packed.run_sorted(x.to(dtype), counts).float()
        want = dense.run_sorted(x.to(dtype).float(), counts)
    assert int4_expert_rows == {"fused": [1, t - 1], "dense": [t, t + 9]}
    assert_rows_close(got, want, 1e-5 if dtype == torch.float32 else 2e-2)


def test_int4_experts_unreadable_tiles_stay_fused(
    int4_expert_rows: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tile layout `dequantize_int4pack_cpu` does not know leaves every expert to the fused kernel."""
    monkeypatch.setattr(moe, "int4pack_cpu_tiles", lambda out_f, in_f: None)
    counts = [moe.INT4_DENSE_MIN_ROWS[torch.float32] + 1]
    packed, dense = tiny_int4_experts(torch.float32, 1)
    x = torch.randn(counts[0], packed.hidden, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert_rows_close(packed.run_sorted(x, counts), dense.run_sorted(x, counts), 1e-5)
    assert int4_expert_rows == {"fused": counts, "dense": []}


def test_int4_dense_min_rows_from_the_environment() -> None:
    code = "import k2serve.model.moe as m; print(sorted(m.INT4_DENSE_MIN_ROWS.values()))"
    env = os.environ | {"K2SERVE_INT4_DENSE_MIN_ROWS": "5"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[5, 5, 5]"  # bf16, fp16 and fp32 alike


def test_int4_experts_bench_times_both_paths_on_the_same_rows(int4_expert_rows: dict[str, list[int]]) -> None:
    experts = int4_experts_bench.int4_expert(ModelConfig.from_dict(PRESETS["tiny"]), torch.bfloat16)
    results = int4_experts_bench.measure(experts, [1, 5], repeats=3, warmup=1)
    assert [r["rows"] for r in results] == [1, 5]
    assert all(r["fused_us"] > 0 and r["dense_us"] > 0 and r["dense_over_fused"] > 0 for r in results)
    assert int4_expert_rows == {"fused": [1] * 4 + [5] * 4, "dense": [1] * 4 + [5] * 4}  # warm-up + 3
    suggest = int4_experts_bench.suggested_threshold
    ratios = [(1, 3.0), (16, 1.2), (32, 0.9), (48, 1.01), (64, 0.8), (128, 0.5)]
    assert suggest([{"rows": n, "dense_over_fused": r} for n, r in ratios]) == 64  # faster from there on
    assert suggest([{"rows": 1, "dense_over_fused": 2.0}]) is None


def test_fp8_checkpoint_equals_its_dequantized_weights(tmp_path: Path) -> None:
    fp8_dir = write_checkpoint(
        tmp_path / "f", "tiny", seed=3, quant="fp8", dtype=torch.float32, tokenizer=False
    )
    shard = load_file(str(next(fp8_dir.glob("model-*.safetensors"))))
    assert any(t.dtype == torch.float8_e4m3fn for t in shard.values())
    fp8 = load_model(fp8_dir)
    assert fp8.layers[0].self_attn.o_proj.weight.dtype == torch.float32
    dense = load_model(dequantized_copy(fp8_dir, tmp_path / "dense"))
    ids = torch.randint(0, dense.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fp8(ids), dense(ids), rtol=1e-5, atol=1e-4)


def test_expert_subset_loads_only_owned(tiny_ckpt: Path) -> None:
    full = load_model(tiny_ckpt)
    part = load_model(tiny_ckpt, expert_ids=[3, 7, 11])
    assert part.layers[1].mlp.experts.w13.shape[0] == 3
    torch.testing.assert_close(part.layers[1].mlp.experts.w13[1], full.layers[1].mlp.experts.w13[7])


Edit = Callable[[dict[str, torch.Tensor]], object]  # changes a shard's tensors in place


def _rewrite(ckpt: Path, dst: Path, edit: Edit) -> Path:
    import shutil

    shutil.copytree(ckpt, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(dst / shard))
        edit(tensors)
        save_file(tensors, str(dst / shard))
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != shard}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("model.layers.1.self_attn.o_proj.weight", None), "model.layers.1.self_attn.o_proj"),
        (lambda t: t.update({k: v[:-1] for k, v in t.items() if k == "model.norm.weight"}), "norm.weight"),
        (
            lambda t: t.update(
                {k: v.to(torch.int32) for k, v in t.items() if k == "model.embed_tokens.weight"}
            ),
            "embed_tokens.weight",
        ),
        (lambda t: t.pop("model.layers.2.mlp.experts.5.down_proj.weight", None), "experts.5.down_proj"),
    ],
)
def test_bad_checkpoint_names_the_tensor(tiny_ckpt: Path, tmp_path: Path, edit: Edit, message: str) -> None:
    bad = _rewrite(tiny_ckpt, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        load_model(bad)


def test_truncated_shard_is_a_clear_error(tiny_ckpt: Path, tmp_path: Path) -> None:
    import shutil

    from k2serve.model.safetensors_io import SafetensorsError

    bad = tmp_path / "trunc"
    shutil.copytree(tiny_ckpt, bad)
    shard = next(bad.glob("model-*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError, match="inconsistent offsets|truncated"):
        load_model(bad)
    shard.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(SafetensorsError, match="header"):
        load_model(bad)
