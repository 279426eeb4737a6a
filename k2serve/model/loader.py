"""Load a Hugging Face-format checkpoint (sharded safetensors) into `K2Model`.

Reads bf16/fp32 weights in the per-expert naming real checkpoints use, compressed-tensors
pack-quantized INT4 routed experts (kept packed), and FP8 e4m3 weights with block scales (dequantised
at load). Can load only a subset of routed experts (an expert-parallel rank's share). Tensors are read
one shard at a time and copied straight into the preallocated model, so peak memory stays near the
model's own size.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from k2serve.config import ModelConfig
from k2serve.model.cpu_linear import prepack_linears
from k2serve.model.int4_linear import Int4Linear, int4_linear_names, int4_linear_supported, replace_linear
from k2serve.model.layers import rope_inv_freq
from k2serve.model.model import K2Model
from k2serve.model.moe import MoE
from k2serve.model.quant import dequantize_fp8_block, dequantize_int4
from k2serve.model.safetensors_io import SafetensorsReader

_EXPERT_RE = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.(\w+)$")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


class CheckpointError(ValueError):
    """The checkpoint is missing a tensor or holds one of the wrong shape or dtype; names the tensor."""


def _shard_index(model_dir: Path) -> dict[str, str]:
    """tensor name -> shard file name."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"no model.safetensors.index.json or model.safetensors in {model_dir}")
    reader = SafetensorsReader(single)
    reader.close()
    return dict.fromkeys(reader.entries, "model.safetensors")


def _strip(name: str) -> str:
    return name[len("model.") :] if name.startswith("model.") else name


class _Reader:
    """Reads tensors by (stripped) name, one shard open at a time, straight into their destination."""

    def __init__(self, model_dir: Path, index: dict[str, str]) -> None:
        self.dir = model_dir
        self.where = {_strip(k): (v, k) for k, v in index.items()}
        self._open_name: str | None = None
        self._open: SafetensorsReader | None = None

    def has(self, name: str) -> bool:
        return name in self.where

    def _entry(self, name: str) -> tuple[SafetensorsReader, str]:
        if name not in self.where:
            raise CheckpointError(f"missing tensor {name!r} (looked for 'model.{name}' or '{name}')")
        shard, full = self.where[name]
        if shard != self._open_name:
            self.close()
            self._open = SafetensorsReader(self.dir / shard)
            self._open_name = shard
        assert self._open is not None
        if full not in self._open.entries:
            raise CheckpointError(f"tensor {full!r} is listed in the index but missing from {shard}")
        return self._open, full

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        f, full = self._entry(name)
        e = f.entries[full]
        return e.dtype, e.shape

    def get(self, name: str) -> torch.Tensor:
        f, full = self._entry(name)
        return f.read(full)

    def load(self, name: str, out: torch.Tensor, dtypes: tuple[torch.dtype, ...] = ()) -> None:
        """Check `name`'s shape (== out's) and dtype (in `dtypes`, default out's), then fill `out`."""
        dtype, shape = self.meta(name)
        _check_meta(name, dtype, shape, out.shape, dtypes or (out.dtype,))
        f, full = self._entry(name)
        if dtype == out.dtype and out.is_contiguous():
            f.read_into(full, out)
        else:
            with torch.no_grad():
                out.copy_(f.read(full))

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
        self._open = None
        self._open_name = None


def _check_meta(
    name: str,
    dtype: torch.dtype,
    shape: Sequence[int],
    want_shape: Sequence[int],
    dtypes: tuple[torch.dtype, ...],
) -> None:
    if tuple(shape) != tuple(want_shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(shape)}, expected {tuple(want_shape)}")
    if dtype not in dtypes:
        raise CheckpointError(f"tensor {name!r} has dtype {dtype}, expected one of {dtypes}")


def _check(name: str, t: torch.Tensor, shape: Sequence[int], dtypes: tuple[torch.dtype, ...]) -> None:
    _check_meta(name, t.dtype, t.shape, shape, dtypes)


_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def _read_linear(
    r: _Reader, prefix: str, shape: Sequence[int], config: ModelConfig, dtype: torch.dtype
) -> torch.Tensor:
    """A dense weight [out, in] from `prefix.weight`, or dequantised from FP8 / INT4 forms."""
    if r.has(prefix + ".weight_packed"):
        packed, scale = r.get(prefix + ".weight_packed"), r.get(prefix + ".weight_scale")
        g = config.quant.group_size if config.quant else 32
        _check(prefix + ".weight_packed", packed, (shape[0], shape[1] // 8), (torch.int32,))
        _check(prefix + ".weight_scale", scale, (shape[0], shape[1] // g), _FLOAT)
        return dequantize_int4(packed, scale, dtype)
    w = r.get(prefix + ".weight")
    if w.dtype == torch.float8_e4m3fn:
        _check(prefix + ".weight", w, shape, (torch.float8_e4m3fn,))
        scale_inv = r.get(prefix + ".weight_scale_inv")
        block = config.quant.block_size if config.quant else (128, 128)
        n = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
        _check(prefix + ".weight_scale_inv", scale_inv, n, (torch.float32, torch.bfloat16))
        return dequantize_fp8_block(w, scale_inv, block, dtype)
    _check(prefix + ".weight", w, shape, _FLOAT)
    return w


def build_empty_model(
    config: ModelConfig,
    dtype: torch.dtype,
    expert_ids: Sequence[int] | None = None,
    int4_group_size: int | None = None,
    device: str | torch.device = "cpu",
    int4_layout: str = "ct",
) -> K2Model:
    """An uninitialised model with parameters in `dtype` (router weights and biases stay fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = K2Model(config, expert_ids, int4_group_size, dtype, int4_layout)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    with torch.no_grad():  # non-persistent buffers must be recomputed after to_empty
        model.rotary.inv_freq.copy_(rope_inv_freq(config.rope, config.qk_rope_head_dim)[0])
        for layer in model.layers:
            experts = getattr(layer.mlp, "experts", None)
            if experts is not None:
                local = torch.full((config.n_routed_experts,), -1, dtype=torch.long)
                local[torch.tensor(experts.expert_ids, dtype=torch.long)] = torch.arange(experts.num_local)
                experts.global_to_local.copy_(local)
    return model


def _int4_experts(config: ModelConfig, reader: _Reader) -> bool:
    """True when the routed experts are stored pack-quantized (then they stay packed in memory)."""
    if config.quant is None or config.quant.method != "int4" or config.num_moe_layers == 0:
        return False
    probe = f"layers.{config.first_k_dense_replace}.mlp.experts.0.gate_proj.weight_packed"
    return reader.has(probe)


def default_int4_layout(device: str | torch.device) -> str:
    """ "cpu" (torch's fused int4 GEMM tiles) on CPU when this torch has the kernel, else "ct"."""
    has_kernel = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    return "cpu" if torch.device(device).type == "cpu" and has_kernel else "ct"


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    expert_ids: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    int4_layout: str | None = None,
) -> K2Model:
    """Build `K2Model` from a checkpoint directory. `expert_ids`: the routed experts to hold (default all).

    `int4_layout` (INT4 checkpoints): how packed experts are held, "ct" (as on disk) or "cpu" (torch's
    CPU int4 tiles for the fused kernel); default `default_int4_layout(device)`.
    bf16 linear layers on the CPU run through oneDNN on prepacked weights (`prepack_linears`: the same
    outputs, faster; K2SERVE_CPU_PREPACK=0 turns it off).
    """
    model_dir = Path(model_dir)
    config = ModelConfig.from_file(model_dir)
    reader = _Reader(model_dir, _shard_index(model_dir))
    int4 = _int4_experts(config, reader)
    group = config.quant.group_size if (int4 and config.quant) else None
    layout = int4_layout or default_int4_layout(device)
    model = build_empty_model(config, dtype, expert_ids, group, device, layout)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    int4_linears = int4_linear_names(model) if layout == "cpu" else set()
    for name, target in params.items():
        if name.startswith("rotary.") or ".experts." in name or name.endswith("global_to_local"):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        module_name = name.removesuffix(".weight")
        if module_name in int4_linears and _load_int4_linear(reader, model, module_name, config, dtype):
            continue
        is_linear = target.dim() == 2 and name.endswith(".weight") and name != "embed_tokens.weight"
        plain = reader.has(name) and reader.meta(name)[0] in _FLOAT
        if is_linear and ".gate.weight" not in name and not plain:
            with torch.no_grad():  # FP8 or INT4 on disk: dequantise into the dense parameter
                target.copy_(_read_linear(reader, name[: -len(".weight")], target.shape, config, dtype))
        else:
            reader.load(name, target, _FLOAT)

    i, d = config.moe_intermediate_size, config.hidden_size
    for layer_idx in range(config.first_k_dense_replace, config.num_hidden_layers):
        moe = model.layers[layer_idx].mlp
        if not isinstance(moe, MoE):
            raise TypeError(f"layer {layer_idx} should be a MoE layer, not {type(moe).__name__}")
        experts = moe.experts
        for local, e in enumerate(experts.expert_ids):
            p = f"layers.{layer_idx}.mlp.experts.{e}"
            if int4:  # stays packed: w13 rows are gate then up
                assert group is not None
                parts = []
                for proj, (o, n) in (("gate", (i, d)), ("up", (i, d)), ("down", (d, i))):
                    name = f"{p}.{proj}_proj"
                    _check_shape_tensor(reader, name, (o, n))
                    packed = torch.empty(o, n // 8, dtype=torch.int32)
                    reader.load(name + ".weight_packed", packed)
                    scale = torch.empty(o, n // group, dtype=dtype)
                    reader.load(name + ".weight_scale", scale, _FLOAT)
                    parts.append((packed, scale))
                (gp, gs), (up_, us), (dp, ds) = parts
                experts.set_int4_expert(local, torch.cat((gp, up_)), torch.cat((gs, us)), dp, ds)
            else:
                for proj, out in (
                    ("gate", experts.w13[local, :i]),
                    ("up", experts.w13[local, i:]),
                    ("down", experts.w2[local]),
                ):
                    name = f"{p}.{proj}_proj"
                    if reader.has(name + ".weight") and reader.meta(name + ".weight")[0] in _FLOAT:
                        reader.load(name + ".weight", out, _FLOAT)
                    else:
                        with torch.no_grad():
                            out.copy_(_read_linear(reader, name, out.shape, config, dtype))
    reader.close()
    _check_unexpected(reader, config)
    model.eval()
    prepack_linears(model)
    return model


def _load_int4_linear(r: _Reader, model: K2Model, name: str, config: ModelConfig, dtype: torch.dtype) -> bool:
    """Where linear layer `name` is stored pack-quantized and fits `Int4Linear`, put one holding it in
    place of the dense layer (model/int4_linear.py) and return True; else False (the caller loads or
    dequantises it into the dense weight)."""
    if not r.has(name + ".weight_packed"):
        return False
    dense = model.get_submodule(name)
    if not isinstance(dense, nn.Linear):
        return False
    out_f, in_f = dense.weight.shape
    group = config.quant.group_size if config.quant else 32
    if not int4_linear_supported(out_f, in_f, group):
        return False
    _check_shape_tensor(r, name, (out_f, in_f))
    packed, scale = r.get(name + ".weight_packed"), r.get(name + ".weight_scale")
    _check(name + ".weight_packed", packed, (out_f, in_f // 8), (torch.int32,))
    _check(name + ".weight_scale", scale, (out_f, in_f // group), _FLOAT)
    layer = Int4Linear(in_f, out_f, group, dtype).to(dense.weight.device)
    layer.set_packed(packed, scale)
    replace_linear(model, name, layer)
    return True


def _check_shape_tensor(r: _Reader, prefix: str, shape: tuple[int, int]) -> None:
    """compressed-tensors stores the unpacked shape as `weight_shape`; when present it must agree."""
    if r.has(prefix + ".weight_shape"):
        ws = r.get(prefix + ".weight_shape").tolist()
        if list(ws) != list(shape):
            raise CheckpointError(f"tensor {prefix + '.weight_shape'!r} says {ws}, expected {list(shape)}")


def _check_unexpected(r: _Reader, config: ModelConfig) -> None:
    """Reject names that belong to no known tensor (multi-token-prediction layers past the last are allowed)."""
    suffixes = (
        ".weight",
        ".weight_packed",
        ".weight_scale",
        ".weight_shape",
        ".weight_scale_inv",
        ".e_score_correction_bias",
    )
    for name in r.where:
        m = _LAYER_RE.match(name)
        if m and int(m.group(1)) >= config.num_hidden_layers:
            continue  # MTP / next-n layers: not used for serving
        if not name.endswith(suffixes):
            raise CheckpointError(f"unexpected tensor {name!r} in checkpoint")
        em = _EXPERT_RE.match(name)
        if em and int(em.group(2)) >= config.n_routed_experts:
            raise CheckpointError(f"tensor {name!r} names expert {em.group(2)} >= n_routed_experts")
