"""Architectures of the random-weight models `k2serve init-model` writes, in Hugging Face config form.

All keep K2's proportions: first layer dense, many routed experts with top-k > 4, one shared
expert, MLA with a latent much smaller than the expanded heads, YaRN RoPE, sigmoid noaux_tc routing.
The vocabulary is a BPE ranks table plus 256 special ids, laid out as K2's is.
"""

from __future__ import annotations

from typing import Any

NUM_SPECIAL_TOKENS = 256

# Special-token offsets from the first special id, as in K2's tokenizer (163584 + offset).
SPECIAL_OFFSETS = {"bos": 0, "eos": 1, "im_end": 2, "pad": 255}


def _base(num_ranks: int) -> dict[str, Any]:
    vocab = num_ranks + NUM_SPECIAL_TOKENS
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "vocab_size": vocab,
        "bos_token_id": num_ranks + SPECIAL_OFFSETS["bos"],
        "eos_token_id": num_ranks + SPECIAL_OFFSETS["im_end"],
        "pad_token_id": num_ranks + SPECIAL_OFFSETS["pad"],
        "hidden_act": "silu",
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "moe_layer_freq": 1,
        "num_nextn_predict_layers": 0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


# K2's positions, as Kimi-K2's config.json: YaRN factor 64 over an original 4,096 = 262,144 positions.
K2_POSITIONS: dict[str, Any] = {
    "max_position_embeddings": 262144,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 64.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
}

PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: a forward pass in milliseconds on one CPU core.
    "tiny": _base(1024)
    | {
        "hidden_size": 128,
        "intermediate_size": 320,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 64,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 16,
        "num_experts_per_tok": 6,
        "n_shared_experts": 1,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.827,
        "max_position_embeddings": 8192,
        "rope_theta": 50000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 2048,
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    },
    # Benchmarks: ~0.4B parameters (~32M active per token), K2's shape at 1/7 width and K2's positions.
    "small": _base(32000)
    | {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 8,
        "first_k_dense_replace": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "q_lora_rank": 384,
        "kv_lora_rank": 256,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "n_routed_experts": 64,
        "num_experts_per_tok": 8,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 2.827,
    }
    | K2_POSITIONS,
}

# Benchmarks: a model like the one issue 16 measured (0.20B parameters, 56M active per token, 64 experts
# top-6, 8 layers): `small`'s layout at 3/4 of its width with half-width experts, so a decode step
# reads about half of `small`'s bytes.
PRESETS["moe200m"] = PRESETS["small"] | {
    "hidden_size": 768,
    "intermediate_size": 2048,
    "moe_intermediate_size": 128,
    "num_experts_per_tok": 6,
}

# Tests and demos of K2's full length: tiny's dimensions with K2's 262,144 positions.
PRESETS["long"] = PRESETS["tiny"] | K2_POSITIONS

# The trained demo model (`k2serve train-demo`, shipped in k2serve/model/demo/): K2's layout at a size
# that trains on two CPU cores in under an hour; 3,072 BPE ranks (every 1-3 digit string among them).
PRESETS["demo"] = (
    _base(3072)
    | {
        "hidden_size": 128,
        "intermediate_size": 384,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 96,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
    }
    | K2_POSITIONS
)
