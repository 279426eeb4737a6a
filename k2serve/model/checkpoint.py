"""Write random-weight checkpoints in the Hugging Face layout real K2 / DeepSeek-V3 checkpoints use.

`config.json`, `model-0000N-of-0000M.safetensors` shards + `model.safetensors.index.json`,
`generation_config.json`, and a tokenizer of K2's kind. Weights are scaled so activations stay O(1)
through the stack and logits are peaked enough for greedy decoding to be well defined; norms and
routing correction biases are random, not trivial. Quantisation: "int4" stores the routed experts
pack-quantized (compressed-tensors, group 32, as Kimi-K2-Thinking); "int4-all" every linear layer but
the router (attention, dense MLP, shared experts, lm_head too: what llama.cpp's Q4_0 does to a model);
"fp8" stores every linear except the router as e4m3 with 128x128 `weight_scale_inv` blocks (as
DeepSeek-V3).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from k2serve.chat.bpe_train import write_tokenizer
from k2serve.config import ModelConfig
from k2serve.model.demo_model import DEMO_PRESET, copy_demo_model, demo_model_dir
from k2serve.model.presets import PRESETS
from k2serve.model.quant import pack_int4, quantize_fp8_block, quantize_int4

INT4_QUANT_CONFIG: dict[str, Any] = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "kv_cache_scheme": None,
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "input_activations": None,
            "output_activations": None,
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": 32,
                "dynamic": False,
                "observer": "minmax",
                "actorder": None,
            },
        }
    },
    "ignore": [
        "lm_head",
        "re:.*self_attn.*",
        "re:.*shared_experts.*",
        "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
    ],
}
INT4_ALL_QUANT_CONFIG: dict[str, Any] = {**INT4_QUANT_CONFIG, "ignore": []}
QUANTS = ("none", "int4", "int4-all", "fp8")
FP8_QUANT_CONFIG: dict[str, Any] = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "weight_block_size": [128, 128],
}


def _linears(config: ModelConfig) -> Iterator[tuple[str, int, int, str]]:
    """(name without '.weight', out, in, kind) for every linear, kind in attn|dense|shared|expert|head."""
    h, heads = config.hidden_size, config.num_attention_heads
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        if config.q_lora_rank:
            yield f"{p}.self_attn.q_a_proj", config.q_lora_rank, h, "attn"
            yield f"{p}.self_attn.q_b_proj", heads * config.qk_head_dim, config.q_lora_rank, "attn"
        else:
            yield f"{p}.self_attn.q_proj", heads * config.qk_head_dim, h, "attn"
        yield f"{p}.self_attn.kv_a_proj_with_mqa", config.kv_cache_dim, h, "attn"
        yield (
            f"{p}.self_attn.kv_b_proj",
            heads * (config.qk_nope_head_dim + config.v_head_dim),
            config.kv_lora_rank,
            "attn",
        )
        yield f"{p}.self_attn.o_proj", h, heads * config.v_head_dim, "attn"
        if not config.is_moe_layer(i):
            m = config.intermediate_size
            yield from (
                (f"{p}.mlp.{n}_proj", *s, "dense")
                for n, s in (("gate", (m, h)), ("up", (m, h)), ("down", (h, m)))
            )
            continue
        m = config.moe_intermediate_size
        for e in range(config.n_routed_experts):
            q = f"{p}.mlp.experts.{e}"
            yield from (
                (f"{q}.{n}_proj", *s, "expert")
                for n, s in (("gate", (m, h)), ("up", (m, h)), ("down", (h, m)))
            )
        if config.n_shared_experts:
            ms = m * config.n_shared_experts
            q = f"{p}.mlp.shared_experts"
            yield from (
                (f"{q}.{n}_proj", *s, "shared")
                for n, s in (("gate", (ms, h)), ("up", (ms, h)), ("down", (h, ms)))
            )
    yield "lm_head", config.vocab_size, h, "head"


def _others(config: ModelConfig, g: torch.Generator) -> Iterator[tuple[str, torch.Tensor]]:
    """Embeddings, norms (random around 1) and routers (weights and correction biases)."""
    h = config.hidden_size
    yield "model.embed_tokens.weight", torch.randn(config.vocab_size, h, generator=g)

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(n, generator=g)

    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", norm(h)
        yield f"{p}.post_attention_layernorm.weight", norm(h)
        if config.q_lora_rank:
            yield f"{p}.self_attn.q_a_layernorm.weight", norm(config.q_lora_rank)
        yield f"{p}.self_attn.kv_a_layernorm.weight", norm(config.kv_lora_rank)
        if config.is_moe_layer(i):
            yield f"{p}.mlp.gate.weight", torch.randn(config.n_routed_experts, h, generator=g) * h**-0.5
            yield (
                f"{p}.mlp.gate.e_score_correction_bias",
                0.1 * torch.randn(config.n_routed_experts, generator=g),
            )
    yield "model.norm.weight", norm(h)


def random_tensors(config: ModelConfig, seed: int, quant: str = "none") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a random checkpoint, in file form (quantised where `quant` says), fp32 otherwise."""
    g = torch.Generator().manual_seed(seed)
    yield from _others(config, g)
    for name, out_f, in_f, kind in _linears(config):
        gain = 4.0 if kind == "head" else 1.0
        w = torch.randn(out_f, in_f, generator=g) * (gain * in_f**-0.5)
        if (quant == "int4" and kind == "expert") or quant == "int4-all":
            q, scale = quantize_int4(w, group_size=32)
            yield f"{name}.weight_packed", pack_int4(q)
            yield f"{name}.weight_scale", scale.to(torch.bfloat16)
            yield f"{name}.weight_shape", torch.tensor([out_f, in_f], dtype=torch.int32)
        elif quant == "fp8" and kind != "head":
            wq, scale_inv = quantize_fp8_block(w)
            yield f"{name}.weight", wq
            yield f"{name}.weight_scale_inv", scale_inv
        else:
            yield f"{name}.weight", w


def write_checkpoint(
    out_dir: str | Path,
    preset: str | dict[str, Any] = "tiny",
    seed: int = 0,
    quant: str = "none",
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 256 << 20,
    tokenizer: bool = True,
) -> Path:
    """Write a random checkpoint; returns the directory. `preset` is a preset name or an HF config dict.
    The `demo` preset is the trained checkpoint the package ships: it is copied, not drawn."""
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {'|'.join(QUANTS)}, got {quant!r}")
    if preset == DEMO_PRESET:
        if quant != "none":
            raise ValueError(f"the demo preset ships unquantised (bf16); quant {quant!r} is not available")
        return copy_demo_model(out_dir)
    cfg_dict = dict(PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    if quant == "int4":
        cfg_dict["quantization_config"] = INT4_QUANT_CONFIG
    elif quant == "int4-all":
        cfg_dict["quantization_config"] = INT4_ALL_QUANT_CONFIG
    elif quant == "fp8":
        cfg_dict["quantization_config"] = FP8_QUANT_CONFIG
    cfg_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    config = ModelConfig.from_dict(cfg_dict)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Shards are written as they fill (bounded memory) and renamed once their count is known.
    shard_names: list[list[str]] = []
    weight_map: dict[str, str] = {}
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        save_file(current, str(out / f"shard-{len(shard_names)}.tmp"), metadata={"format": "pt"})
        shard_names.append(list(current))
        current.clear()

    for name, raw in random_tensors(config, seed, quant):
        keep = name.endswith(("e_score_correction_bias", "weight_scale_inv", "weight_scale"))
        cast = raw.is_floating_point() and raw.dtype != torch.float8_e4m3fn and not keep
        t = raw.to(dtype) if cast else raw
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        current[name] = t.contiguous()
        size += nbytes
        total += nbytes
    flush()
    for k, names in enumerate(shard_names):
        fname = f"model-{k + 1:05d}-of-{len(shard_names):05d}.safetensors"
        (out / f"shard-{k}.tmp").rename(out / fname)
        weight_map.update(dict.fromkeys(names, fname))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    gen = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "do_sample": False,
        "max_length": config.max_position_embeddings,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer:
        write_tokenizer(out, config.vocab_size - 256)
    return out


def preset_checkpoint(root: str | Path, preset: str, seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """The random checkpoint of `preset` with `seed` (`demo`: the shipped trained one, whatever the seed) (in `dtype`, default bf16 as write_checkpoint's) under
    `root` (`root/models/<preset>-seed<seed>[-<dtype>]`), written on first use and reused afterwards.
    Processes starting at once each write a directory of their own and rename it into place: the first
    rename wins, the others discard theirs."""
    if preset == DEMO_PRESET:  # the trained checkpoint shipped with the package, used where it lies
        return demo_model_dir()
    suffix = "" if dtype is None else "-" + str(dtype).removeprefix("torch.")
    out = Path(root) / "models" / f"{preset}-seed{seed}{suffix}"
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        write_checkpoint(tmp, preset, seed=seed, dtype=torch.bfloat16 if dtype is None else dtype)
        try:
            tmp.rename(out)  # atomic: concurrent starters either see the whole checkpoint or none
        except OSError:
            shutil.rmtree(tmp)  # another process got there first
            if not (out / "config.json").exists():
                raise
    return out


def skew_routing(ckpt_dir: str | Path, hot_experts: Sequence[int], bias: float) -> Path:
    """Add `bias` to the router's `e_score_correction_bias` of `hot_experts` in every MoE layer of the
    checkpoint at `ckpt_dir`, in place; returns the directory. K2's noaux_tc routing picks top-k on
    score + bias, so a positive bias makes those experts take most of the tokens: the skewed routing
    EPLB's tests and benchmarks balance. Only the bias changes, so the model stays a valid K2 model."""
    out = Path(ckpt_dir)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shards: dict[str, list[str]] = {}
    for name, fname in index.items():
        if name.endswith(".mlp.gate.e_score_correction_bias"):
            shards.setdefault(fname, []).append(name)
    if not shards:
        raise ValueError(f"{out} has no MoE router bias (e_score_correction_bias) to skew")
    hot = torch.tensor(list(hot_experts), dtype=torch.long)
    for fname, names in shards.items():
        with safe_open(str(out / fname), "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        for name in names:
            tensors[name][hot] += bias
        save_file(tensors, str(out / fname), metadata=metadata)
    return out
