"""The memory model of one rank: weights by kind, the latent KV per token, an activation estimate.

Units are bytes throughout. The layout is an expert-parallel group of `ep` ranks that split the routed
experts; attention is either replicated per rank (DP attention, `attention_tp` 1: every rank serves its
own sequences) or split over `attention_tp` ranks by heads. MLA caches one latent per token shared by
all heads, so tensor-parallel attention does not split the KV: the `attention_tp` ranks of a TP group
each hold the same sequences' whole latent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from k2serve.config import ModelConfig

BUNDLED = {"kimi-k2-thinking": Path(__file__).with_name("kimi-k2-thinking.config.json")}
SESSION_TOKENS = 262_144  # a 256K agent session
FP32 = 4


class CapacityError(ValueError):
    """A layout does not fit its device; the message names the numbers."""


def load_config(name_or_path: str) -> ModelConfig:
    """A bundled config by name (BUNDLED), or a config.json / checkpoint directory path."""
    if name_or_path in BUNDLED:
        return ModelConfig.from_dict(json.loads(BUNDLED[name_or_path].read_text()))
    return ModelConfig.from_file(name_or_path)


@dataclass(frozen=True)
class Layout:
    """ep: ranks of the expert-parallel group; attention_tp: ranks that split the attention heads,
    the dense MLP, the shared experts and the vocabulary (1 = DP attention); redundant_experts:
    extra expert replicas over the group (EPLB)."""

    ep: int = 1
    attention_tp: int = 1
    redundant_experts: int = 0

    def __post_init__(self) -> None:
        if self.ep < 1 or self.attention_tp < 1 or self.redundant_experts < 0:
            raise CapacityError(
                f"ep and attention_tp must be >= 1 and redundant_experts >= 0, got "
                f"ep={self.ep}, attention_tp={self.attention_tp}, redundant_experts={self.redundant_experts}"
            )
        if self.ep % self.attention_tp:
            raise CapacityError(f"attention_tp={self.attention_tp} must divide ep={self.ep}")

    @property
    def dp_attention(self) -> bool:
        return self.attention_tp == 1


@dataclass(frozen=True)
class Workload:
    """max_model_len: longest sequence; max_num_batched_tokens: tokens of one forward per rank;
    max_num_seqs: rows sampled per step; kv_bytes / act_bytes: bytes per cached value / activation;
    attention_tile: context positions one tiled-attention step scores at a time."""

    max_model_len: int = SESSION_TOKENS
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 64
    kv_bytes: int = 2
    act_bytes: int = 2
    attention_tile: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_batched_tokens", "max_num_seqs", "kv_bytes", "act_bytes"):
            if getattr(self, name) < 1:
                raise CapacityError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_tile < 1:
            raise CapacityError(f"attention_tile must be >= 1, got {self.attention_tile}")


@dataclass(frozen=True)
class WeightBytes:
    """One rank's weights: dense (attention, layer-0 MLP, shared experts, norms, router gates, in the
    checkpoint's dtype), routed experts (as stored: INT4 packed + group scales, FP8 + block scales, or
    dense), embeddings (embed_tokens + lm_head)."""

    dense: int
    routed_experts: int
    embeddings: int

    @property
    def total(self) -> int:
        return self.dense + self.routed_experts + self.embeddings


def bytes_per_expert_param(config: ModelConfig, dense_bytes: int = 2) -> float:
    """Bytes one routed-expert weight takes as the checkpoint stores it: INT4 (compressed-tensors
    pack-quantized) is 4 bits + a bf16 scale per `group_size` inputs; FP8 is 1 byte + an fp32 scale
    per 128x128 block; unquantised, `dense_bytes`."""
    q = config.quant
    if q is None:
        return float(dense_bytes)
    if q.method == "int4":
        return q.num_bits / 8 + 2 / q.group_size
    rows, cols = q.block_size
    return 1 + FP32 / (rows * cols)


def experts_per_rank(config: ModelConfig, layout: Layout) -> int:
    return math.ceil((config.n_routed_experts + layout.redundant_experts) / layout.ep)


def weight_bytes(config: ModelConfig, layout: Layout, dense_bytes: int = 2) -> WeightBytes:
    """Weights one rank holds. Routed experts: `experts_per_rank` of each MoE layer. Attention, the
    dense MLP, shared experts and the vocabulary split over `attention_tp`; norms and router gates
    (with their fp32 correction bias) are replicated. FP8 checkpoints quantise every linear but the
    vocabulary (1 byte + block scales)."""
    h, tp = config.hidden_size, layout.attention_tp
    counts = config.parameter_counts()
    expert = 3 * h * config.moe_intermediate_size  # gate, up, down of one expert
    n_dense, n_moe = config.first_k_dense_replace, config.num_moe_layers
    linear_bytes = bytes_per_expert_param(config, dense_bytes) if _fp8(config) else dense_bytes
    split = (
        counts["attention"]
        + n_dense * 3 * h * config.intermediate_size
        + n_moe * config.n_shared_experts * expert
    )
    norms = config.num_hidden_layers * 2 * h + h  # input / post-attention norms, the final norm
    router = n_moe * config.n_routed_experts * h
    dense = math.ceil(split * linear_bytes / tp) + (norms + router) * dense_bytes
    dense += n_moe * config.n_routed_experts * FP32  # e_score_correction_bias
    routed = n_moe * experts_per_rank(config, layout) * expert * bytes_per_expert_param(config, dense_bytes)
    return WeightBytes(dense, math.ceil(routed), math.ceil(counts["embeddings"] * dense_bytes / tp))


def _fp8(config: ModelConfig) -> bool:
    return config.quant is not None and config.quant.method == "fp8"


def fp8_row_bytes(kv_rank: int, rope_dim: int) -> int:
    """Bytes of one token of one layer in the fp8 latent cache (k2serve/kvcache/fp8.py, vLLM's
    fp8_ds_mla row): kv_rank fp8 values, fp32 scale slots (one per 128 values, padded to 16 bytes)
    and rope_dim bf16 values: 512 + 16 + 128 = 656 for K2."""
    return kv_rank + -(-4 * math.ceil(kv_rank / 128) // 16) * 16 + 2 * rope_dim


def kv_bytes_per_token(config: ModelConfig, kv_bytes: int = 2) -> int:
    """The latent one token caches over all layers: (kv_lora_rank + qk_rope_head_dim) values per layer
    of `kv_bytes` each; kv_bytes 1 is the fp8 cache, whose rows also hold the scales and keep the
    RoPE part in bf16 (`fp8_row_bytes`)."""
    if kv_bytes == 1:
        return config.num_hidden_layers * fp8_row_bytes(config.kv_lora_rank, config.qk_rope_head_dim)
    return config.num_hidden_layers * config.kv_cache_dim * kv_bytes


def activation_bytes(config: ModelConfig, layout: Layout, work: Workload) -> int:
    """An estimate of the transient memory of one forward of `max_num_batched_tokens` tokens on one
    rank (the engine measures it instead where the allocator can tell: on CUDA).

    The residual stream and its normed copy, plus the largest of one layer's transients: attention
    (q, output, a tile of expanded k/v, fp32 scores and probabilities of a tile), the MoE (dispatched
    tokens sent and received, gate/up/activation of each token's top-k experts) or the dense MLP;
    plus the fp32 logits of `max_num_seqs` sampled rows.
    """
    t, h, a = work.max_num_batched_tokens, config.hidden_size, work.act_bytes
    heads = config.num_attention_heads // layout.attention_tp
    tile = min(work.attention_tile, work.max_model_len)
    residual = 2 * t * h * a
    attention = (
        t * heads * (config.qk_head_dim + config.v_head_dim) * a
        + tile * heads * (config.qk_nope_head_dim + config.v_head_dim) * a
        + 2 * t * heads * tile * FP32
    )
    k = config.num_experts_per_tok
    moe = t * k * (2 * h + 3 * config.moe_intermediate_size) * a
    dense = t * 3 * config.intermediate_size // layout.attention_tp * a
    logits = min(work.max_num_seqs, t) * config.vocab_size * FP32
    return residual + max(attention, moe, dense) + logits


@dataclass(frozen=True)
class RankPlan:
    """One rank of a layout on a device: what it holds, and what its KV pool can serve."""

    device_name: str
    device_bytes: int
    usable_bytes: int
    weights: WeightBytes
    activations: int
    kv_per_token: int
    max_model_len: int
    ranks: int
    sequence_groups: int  # groups of ranks that hold distinct sequences (ep / attention_tp)

    @property
    def kv_pool_bytes(self) -> int:
        """What is left for the latent pool (negative: the weights and activations alone overflow)."""
        return self.usable_bytes - self.weights.total - self.activations

    @property
    def kv_tokens(self) -> int:
        return max(self.kv_pool_bytes, 0) // self.kv_per_token

    @property
    def session_bytes(self) -> int:
        """One max_model_len sequence's latent."""
        return self.max_model_len * self.kv_per_token

    @property
    def sessions_per_rank(self) -> int:
        return self.kv_tokens // self.max_model_len

    @property
    def sessions_per_group(self) -> int:
        return self.sessions_per_rank * self.sequence_groups

    @property
    def fits(self) -> bool:
        return self.sessions_per_rank >= 1

    def check(self) -> None:
        """Raise CapacityError, naming the numbers, unless weights + activations + one max_model_len
        sequence fit the usable memory."""
        if self.fits:
            return
        need = self.weights.total + self.activations + self.session_bytes
        raise CapacityError(
            f"does not fit on {self.device_name}: weights {gib(self.weights.total)} + activations "
            f"{gib(self.activations)} + one {self.max_model_len}-token sequence's KV "
            f"{gib(self.session_bytes)} = {gib(need)} > usable {gib(self.usable_bytes)} per rank"
        )


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def plan(
    config: ModelConfig,
    device_name: str,
    device_bytes: int,
    layout: Layout,
    work: Workload,
    utilization: float = 0.9,
    dense_bytes: int = 2,
) -> RankPlan:
    """The plan of one rank with `utilization` of `device_bytes` usable (the rest: the CUDA context,
    communication buffers, fragmentation)."""
    if not 0 < utilization <= 1:
        raise CapacityError(f"utilization must be in (0, 1], got {utilization}")
    if work.max_model_len > config.max_position_embeddings:
        raise CapacityError(
            f"max_model_len {work.max_model_len} exceeds the model's max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    return RankPlan(
        device_name=device_name,
        device_bytes=device_bytes,
        usable_bytes=int(device_bytes * utilization),
        weights=weight_bytes(config, layout, dense_bytes),
        activations=activation_bytes(config, layout, work),
        kv_per_token=kv_bytes_per_token(config, work.kv_bytes),
        max_model_len=work.max_model_len,
        ranks=layout.ep,
        sequence_groups=layout.ep // layout.attention_tp,
    )
