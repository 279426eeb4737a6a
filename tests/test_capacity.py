"""The memory model (k2serve.capacity) against figures computed by hand from the Kimi-K2-Thinking
config (/work/shared/reference/README.md: 576 latent values per token per layer, 70,272 bytes per token
over 61 layers in bf16, 17.2 GiB for one 262,144-token sequence)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from k2serve.capacity.devices import GPUS, DeviceError, device
from k2serve.capacity.memory import (
    BUNDLED,
    CapacityError,
    Layout,
    Workload,
    activation_bytes,
    bytes_per_expert_param,
    kv_bytes_per_token,
    load_config,
    plan,
    weight_bytes,
)
from k2serve.config import ModelConfig

K2 = load_config("kimi-k2-thinking")
GiB = 1 << 30

# One layer's attention by hand: q_a 7168x1536 + q_a_norm 1536 + q_b 1536x(64x192) + kv_a 7168x576
# + kv_a_norm 512 + kv_b 512x(64x256) + o_proj (64x128)x7168.
ATTN_LAYER = 7168 * 1536 + 1536 + 1536 * 64 * 192 + 7168 * 576 + 512 + 512 * 64 * 256 + 64 * 128 * 7168
EXPERT = 3 * 7168 * 2048  # gate, up, down of one routed (or the shared) expert


def test_bundled_config_is_the_reference_one() -> None:
    assert K2.num_hidden_layers == 61 and K2.kv_cache_dim == 576 and K2.n_routed_experts == 384
    assert K2.quant is not None and (K2.quant.method, K2.quant.group_size) == ("int4", 32)
    # the package ships its own copy: nothing at run time reads the shared reference folder
    assert BUNDLED["kimi-k2-thinking"].parent == Path(__import__("k2serve.capacity").capacity.__file__).parent


def test_kv_per_token_and_per_256k_session() -> None:
    assert kv_bytes_per_token(K2) == 576 * 2 * 61 == 70_272
    # the fp8 cache: 512 fp8 + 16 B of scales + 64 bf16 RoPE values = 656 B per layer (57% of bf16)
    assert kv_bytes_per_token(K2, kv_bytes=1) == 656 * 61 == 40_016
    p = plan(K2, "h200", GPUS["h200"].memory_bytes, Layout(ep=16), Workload())
    assert p.session_bytes == 262_144 * 70_272 == 18_421_383_168
    assert round(p.session_bytes / GiB, 2) == 17.16


def test_weights_per_rank_by_kind() -> None:
    assert bytes_per_expert_param(K2) == 0.5 + 2 / 32  # 4 bits + a bf16 scale per 32 inputs
    w = weight_bytes(K2, Layout(ep=16))
    # 384 experts over 16 ranks: 24 per rank in each of 60 MoE layers, INT4 with group scales.
    assert w.routed_experts == 24 * 60 * EXPERT * 9 // 16 == 35_672_555_520
    assert w.embeddings == 2 * 163_840 * 7168 * 2  # embed_tokens + lm_head, bf16
    dense_params = (
        61 * ATTN_LAYER  # attention
        + 3 * 7168 * 18_432  # layer 0's dense MLP
        + 60 * EXPERT  # shared experts
        + 61 * 2 * 7168
        + 7168  # norms
        + 60 * 384 * 7168  # router gates
    )
    assert w.dense == dense_params * 2 + 60 * 384 * 4  # bf16, plus the fp32 correction bias
    # EP 8 doubles the routed experts per rank; attention TP 2 halves the split dense part.
    assert weight_bytes(K2, Layout(ep=8)).routed_experts == 2 * w.routed_experts
    tp2 = weight_bytes(K2, Layout(ep=16, attention_tp=2))
    assert tp2.embeddings == w.embeddings // 2
    assert (
        tp2.dense
        == (dense_params - 61 * 2 * 7168 - 7168 - 60 * 384 * 7168)
        + (61 * 2 * 7168 + 7168 + 60 * 384 * 7168) * 2
        + 60 * 384 * 4
    )
    # redundant experts: 32 extra replicas over 16 ranks = 26 per rank
    assert weight_bytes(K2, Layout(ep=16, redundant_experts=32)).routed_experts == 26 * 60 * EXPERT * 9 // 16


def test_sessions_on_h200_and_h100() -> None:
    h200 = plan(K2, "h200", 143_771 << 20, Layout(ep=16), Workload())
    assert h200.usable_bytes == int((143_771 << 20) * 0.9)
    left = h200.usable_bytes - h200.weights.total - h200.activations
    assert h200.kv_tokens == left // 70_272
    assert h200.sessions_per_rank == left // 70_272 // 262_144 == 3
    assert h200.sessions_per_group == 48  # DP attention: every rank its own sequences
    h200.check()
    # Attention TP 2: two ranks hold the same sequences' latent (MLA does not split the KV by head).
    tp2 = plan(K2, "h200", 143_771 << 20, Layout(ep=16, attention_tp=2), Workload())
    assert tp2.sessions_per_group == tp2.sessions_per_rank * 8
    h100 = plan(K2, "h100", 81_559 << 20, Layout(ep=16), Workload())
    assert h100.sessions_per_rank == 0 and not h100.fits
    with pytest.raises(CapacityError, match=r"weights 55\.06 GiB .* 17\.16 GiB .* > usable 71\.68 GiB"):
        h100.check()


def test_activation_estimate_terms() -> None:
    work = Workload(max_num_batched_tokens=1024, max_num_seqs=16, attention_tile=512)
    t, h = 1024, 7168
    attention = t * 64 * (192 + 128) * 2 + 512 * 64 * 256 * 2 + 2 * t * 64 * 512 * 4
    moe = t * 8 * (2 * h + 3 * 2048) * 2
    assert moe > attention  # at a 512-position tile the MoE's dispatch and expert activations dominate
    expected = 2 * t * h * 2 + moe + 16 * 163_840 * 4
    assert activation_bytes(K2, Layout(ep=16), work) == expected


def test_bad_inputs_name_the_value() -> None:
    with pytest.raises(CapacityError, match="attention_tp=3 must divide ep=16"):
        Layout(ep=16, attention_tp=3)
    with pytest.raises(CapacityError, match="max_num_batched_tokens must be >= 1, got 0"):
        Workload(max_num_batched_tokens=0)
    with pytest.raises(CapacityError, match="max_model_len 300000 exceeds .* 262144"):
        plan(K2, "h200", 1 << 40, Layout(), Workload(max_model_len=300_000))
    with pytest.raises(DeviceError, match="unknown device 'a100'"):
        device("a100")
    assert device("cpu").memory_bytes > 1 << 28


def test_unquantised_and_fp8_configs(tmp_path: Path) -> None:
    raw = json.loads(BUNDLED["kimi-k2-thinking"].read_text())
    raw.pop("quantization_config")
    dense = ModelConfig.from_dict(raw)
    assert weight_bytes(dense, Layout(ep=16)).routed_experts == 24 * 60 * EXPERT * 2
    raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    fp8 = load_config(str(tmp_path))
    assert bytes_per_expert_param(fp8) == 1 + 4 / (128 * 128)
    assert weight_bytes(fp8, Layout(ep=16)).embeddings == 2 * 163_840 * 7168 * 2  # vocabulary stays bf16
