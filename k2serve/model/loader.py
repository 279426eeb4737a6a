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
from typing import Any

import torch
from safetensors import safe_open

from k2serve.config import ModelConfig
from k2serve.model.layers import rope_inv_freq
from k2serve.model.model import K2Model
from k2serve.model.quant import dequantize_fp8_block, dequantize_int4

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
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def _strip(name: str) -> str:
    return name[len("model.") :] if name.startswith("model.") else name


class _Reader:
    """Reads tensors by (stripped) name, keeping one shard open at a time (bounded resident memory)."""

    def __init__(self, model_dir: Path, index: dict[str, str]) -> None:
        self.dir = model_dir
        self.where = {_strip(k): (v, k) for k, v in index.items()}
        self._open_name: str | None = None
        self._open: Any = None

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"missing tensor {name!r} (looked for 'model.{name}' or '{name}')")
        shard, full = self.where[name]
        if shard != self._open_name:
            self.close()
            self._open = safe_open(str(self.dir / shard), framework="pt")
            self._open_name = shard
        return self._open.get_tensor(full)

    def close(self) -> None:
        self._open = None  # dropping the handle unmaps the shard
        self._open_name = None


def _check(name: str, t: torch.Tensor, shape: Sequence[int], dtypes: tuple[torch.dtype, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in dtypes:
        raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, expected one of {dtypes}")


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
) -> K2Model:
    """An uninitialised model with parameters in `dtype` (router weights and biases stay fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = K2Model(config, expert_ids, int4_group_size, dtype)
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


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    expert_ids: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
) -> K2Model:
    """Build `K2Model` from a checkpoint directory. `expert_ids`: the routed experts to hold (default all)."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_file(model_dir)
    reader = _Reader(model_dir, _shard_index(model_dir))
    int4 = _int4_experts(config, reader)
    group = config.quant.group_size if (int4 and config.quant) else None
    model = build_empty_model(config, dtype, expert_ids, group, device)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    filled: set[str] = set()

    def put(name: str, value: torch.Tensor) -> None:
        target = params[name]
        if tuple(target.shape) != tuple(value.shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(value)
        filled.add(name)

    for name, target in params.items():
        if name.startswith("rotary.") or ".experts." in name or name.endswith("global_to_local"):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if (
            name.endswith(".weight")
            and target.dim() == 2
            and name not in ("embed_tokens.weight",)
            and ".gate.weight" not in name
        ):
            put(name, _read_linear(reader, name[: -len(".weight")], target.shape, config, dtype))
        else:
            t = reader.get(name)
            _check(name, t, target.shape, _FLOAT)
            put(name, t)

    i, d = config.moe_intermediate_size, config.hidden_size
    for layer_idx in range(config.first_k_dense_replace, config.num_hidden_layers):
        experts = model.layers[layer_idx].mlp.experts
        for local, e in enumerate(experts.expert_ids):
            p = f"layers.{layer_idx}.mlp.experts.{e}"
            if int4:
                gate = _read_packed(reader, p + ".gate_proj", (i, d), group)
                up = _read_packed(reader, p + ".up_proj", (i, d), group)
                down = _read_packed(reader, p + ".down_proj", (d, i), group)
                with torch.no_grad():
                    experts.w13_packed[local] = torch.cat((gate[0], up[0]))
                    experts.w13_scale[local] = torch.cat((gate[1], up[1]))
                    experts.w2_packed[local] = down[0]
                    experts.w2_scale[local] = down[1]
            else:
                gate = _read_linear(reader, p + ".gate_proj", (i, d), config, dtype)
                up = _read_linear(reader, p + ".up_proj", (i, d), config, dtype)
                down = _read_linear(reader, p + ".down_proj", (d, i), config, dtype)
                with torch.no_grad():
                    experts.w13[local] = torch.cat((gate, up))
                    experts.w2[local] = down
    reader.close()
    _check_unexpected(reader, config)
    model.eval()
    return model


def _read_packed(
    r: _Reader, prefix: str, shape: tuple[int, int], group: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    assert group is not None
    packed, scale = r.get(prefix + ".weight_packed"), r.get(prefix + ".weight_scale")
    _check(prefix + ".weight_packed", packed, (shape[0], shape[1] // 8), (torch.int32,))
    _check(prefix + ".weight_scale", scale, (shape[0], shape[1] // group), _FLOAT)
    if r.has(prefix + ".weight_shape"):
        ws = r.get(prefix + ".weight_shape").tolist()
        if list(ws) != list(shape):
            raise CheckpointError(f"tensor {prefix + '.weight_shape'!r} says {ws}, expected {list(shape)}")
    return packed, scale


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
