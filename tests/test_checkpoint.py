"""Checkpoint formats: INT4 pack-quantized experts, FP8 block weights, expert subsets, bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from k2serve.model.checkpoint import write_checkpoint
from k2serve.model.loader import CheckpointError, load_model
from k2serve.model.quant import (
    dequantize_fp8_block,
    dequantize_int4,
    pack_int4,
    quantize_fp8_block,
    quantize_int4,
    unpack_int4,
)


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


def _dequantized_copy(src: Path, dst: Path) -> None:
    """The same checkpoint with every INT4 or FP8 weight replaced by its dense dequantised form."""
    dst.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    new_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(src / shard))
        out = {}
        for name, t in tensors.items():
            if name.endswith(".weight_packed"):
                base = name[: -len("_packed")]
                out[base] = dequantize_int4(t, tensors[base + "_scale"], torch.float32)
            elif t.dtype == torch.float8_e4m3fn:
                out[name] = dequantize_fp8_block(t, tensors[name + "_scale_inv"])
            elif not name.endswith((".weight_scale", ".weight_shape", ".weight_scale_inv")):
                out[name] = t
        save_file(out, str(dst / shard))
        new_map.update(dict.fromkeys(out, shard))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": new_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("layout", ["ct", "cpu"])
def test_int4_model_equals_dequantized_model(tiny_int4_ckpt: Path, tmp_path: Path, layout: str) -> None:
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
    _dequantized_copy(tiny_int4_ckpt, tmp_path / "dense")
    dense = load_model(tmp_path / "dense", torch.float32)
    ids = torch.randint(0, packed.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = packed(ids), dense(ids)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_fp8_checkpoint_equals_its_dequantized_weights(tmp_path: Path) -> None:
    fp8_dir = write_checkpoint(
        tmp_path / "f", "tiny", seed=3, quant="fp8", dtype=torch.float32, tokenizer=False
    )
    shard = load_file(str(next(fp8_dir.glob("model-*.safetensors"))))
    assert any(t.dtype == torch.float8_e4m3fn for t in shard.values())
    fp8 = load_model(fp8_dir)
    assert fp8.layers[0].self_attn.o_proj.weight.dtype == torch.float32
    _dequantized_copy(fp8_dir, tmp_path / "dense")
    dense = load_model(tmp_path / "dense")
    ids = torch.randint(0, dense.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fp8(ids), dense(ids), rtol=1e-5, atol=1e-4)


def test_expert_subset_loads_only_owned(tiny_ckpt: Path) -> None:
    full = load_model(tiny_ckpt)
    part = load_model(tiny_ckpt, expert_ids=[3, 7, 11])
    assert part.layers[1].mlp.experts.w13.shape[0] == 3
    torch.testing.assert_close(part.layers[1].mlp.experts.w13[1], full.layers[1].mlp.experts.w13[7])


def _rewrite(ckpt: Path, dst: Path, edit) -> Path:
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
def test_bad_checkpoint_names_the_tensor(tiny_ckpt: Path, tmp_path: Path, edit, message: str) -> None:
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
