from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from k2serve.config import ConfigError, ModelConfig
from k2serve.model.presets import PRESETS
from tests.conftest import shared_path


def test_kimi_k2_thinking_parameter_counts() -> None:
    cfg = ModelConfig.from_file(shared_path("reference", "kimi-k2-thinking.config.json"))
    counts = cfg.parameter_counts()
    # Computed from the architecture: 1.0264T total (the routed experts alone are 1.0147T), 32.86B active.
    assert 1.02e12 < counts["total"] < 1.05e12
    assert counts["routed_experts"] == 60 * 384 * 3 * 7168 * 2048
    assert 31e9 < counts["active"] < 34e9
    assert cfg.kv_cache_dim == 576
    assert cfg.kv_cache_dim * cfg.num_hidden_layers * 2 == 70_272  # bytes per token in bf16
    assert cfg.softmax_scale == pytest.approx(0.144680, abs=1e-6)
    assert cfg.quant is not None and cfg.quant.method == "int4" and cfg.quant.group_size == 32
    assert cfg.model_type == "kimi_k2" and cfg.rope.kind == "yarn" and cfg.rope.factor == 64.0


def test_deepseek_v3_count_matches_published_671b() -> None:
    # Cross-check of the arithmetic on DeepSeek-V3's public architecture (671B without the MTP layer).
    d = dict(PRESETS["tiny"]) | {
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "first_k_dense_replace": 3,
        "num_attention_heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
    }
    counts = ModelConfig.from_dict(d).parameter_counts()
    assert round(counts["total"] / 1e9) == 671
    assert 36.5e9 < counts["active"] < 38e9  # "37B activated", embeddings and lm_head included


def test_rope_parameters_new_form_equals_legacy() -> None:
    legacy = dict(PRESETS["tiny"])
    new = {k: v for k, v in legacy.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = dict(legacy["rope_scaling"], rope_type="yarn", rope_theta=legacy["rope_theta"])
    del new["rope_parameters"]["type"]
    assert ModelConfig.from_dict(new).rope == ModelConfig.from_dict(legacy).rope
    plain = {k: v for k, v in legacy.items() if k != "rope_scaling"}
    assert ModelConfig.from_dict(plain).rope.kind == "default"
    assert math.isclose(ModelConfig.from_dict(plain).softmax_scale, 48**-0.5)


def test_fp8_quant_config() -> None:
    d = dict(PRESETS["tiny"]) | {
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    }
    q = ModelConfig.from_dict(d).quant
    assert q is not None and q.method == "fp8" and q.block_size == (128, 128)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hidden_size": None}, "hidden_size"),
        ({"hidden_size": "big"}, "hidden_size"),
        ({"model_type": "llama"}, "model_type"),
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 9}, "topk_group"),
        ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
        ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling.type"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config.quant_method"),
        ({"vocab_size": -1}, "vocab_size"),
    ],
)
def test_invalid_field_is_named(change: dict, field: str) -> None:
    d = dict(PRESETS["tiny"])
    for k, v in change.items():
        if v is None:
            del d[k]
        else:
            d[k] = v
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d)
    assert e.value.field_name == field
    assert field in str(e.value)


def test_to_hf_dict_round_trips(tmp_path: Path) -> None:
    cfg = ModelConfig.from_dict(dict(PRESETS["small"]))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    again = ModelConfig.from_file(tmp_path)
    assert again.parameter_counts() == cfg.parameter_counts()
    assert again.rope == cfg.rope
