"""Model configuration: parse a Hugging Face `config.json` of the DeepSeek-V3 / Kimi-K2 family.

Every size the model uses comes from here; nothing else in the package hard-codes an architecture.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "kimi_k2")


class ConfigError(ValueError):
    """A config field is missing or invalid; the message names the field and the value."""

    def __init__(self, field_name: str, problem: str, value: Any = None) -> None:
        self.field_name = field_name
        self.value = value
        super().__init__(
            f"config field {field_name!r}: {problem}" + ("" if value is None else f" (got {value!r})")
        )


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters. `kind` is "default" or "yarn"."""

    theta: float
    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("default", "yarn"):
            raise ConfigError("rope_scaling.type", "only 'default' and 'yarn' are supported", self.kind)
        if self.theta <= 0:
            raise ConfigError("rope_theta", "must be > 0", self.theta)
        if self.kind == "yarn" and self.factor < 1.0:
            raise ConfigError("rope_scaling.factor", "must be >= 1 for yarn", self.factor)


@dataclass(frozen=True)
class QuantConfig:
    """Checkpoint quantization.

    method "int4": compressed-tensors pack-quantized, symmetric, `group_size` along the input dim,
    applied to the linears not matched by `ignore` (for K2: the routed experts only).
    method "fp8": e4m3 weights with `block_size` x `block_size` `weight_scale_inv` blocks.
    """

    method: str
    group_size: int = 32
    num_bits: int = 4
    block_size: tuple[int, int] = (128, 128)
    ignore: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.method not in ("int4", "fp8"):
            raise ConfigError("quantization_config.quant_method", "unsupported", self.method)
        if self.method == "int4" and self.num_bits != 4:
            raise ConfigError(
                "quantization_config.weights.num_bits", "only 4-bit is supported", self.num_bits
            )
        if self.group_size <= 0:
            raise ConfigError("quantization_config.weights.group_size", "must be > 0", self.group_size)


def _int(d: dict[str, Any], key: str, default: int | None = None, minimum: int = 0) -> int:
    if key not in d or d[key] is None:
        if default is None:
            raise ConfigError(key, "is missing")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(key, "must be an integer", v)
    if v < minimum:
        raise ConfigError(key, f"must be >= {minimum}", v)
    return v


def _float(d: dict[str, Any], key: str, default: float | None = None) -> float:
    if key not in d or d[key] is None:
        if default is None:
            raise ConfigError(key, "is missing")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(key, "must be a number", v)
    return float(v)


def _parse_rope(d: dict[str, Any]) -> RopeConfig:
    # Newer transformers write `rope_parameters` (with rope_theta inside); older configs write
    # `rope_theta` + `rope_scaling` (with "type" or "rope_type").
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ConfigError("rope_parameters", "must be an object", params)
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError("rope_scaling", "must be an object or null", scaling)
    src: dict[str, Any] = dict(params or scaling or {})
    theta = src.get("rope_theta", d.get("rope_theta"))
    if theta is None:
        raise ConfigError("rope_theta", "is missing")
    kind = src.get("rope_type", src.get("type", "default"))
    if kind == "yarn":
        if "factor" not in src:
            raise ConfigError("rope_scaling.factor", "is missing for yarn")
        return RopeConfig(
            theta=float(theta),
            kind="yarn",
            factor=float(src["factor"]),
            original_max_position_embeddings=int(src.get("original_max_position_embeddings", 4096)),
            beta_fast=float(src.get("beta_fast") or 32.0),
            beta_slow=float(src.get("beta_slow") or 1.0),
            mscale=float(src.get("mscale") or 0.0),
            mscale_all_dim=float(src.get("mscale_all_dim") or 0.0),
            truncate=bool(src.get("truncate", True)),
        )
    return RopeConfig(theta=float(theta), kind=str(kind))


def _parse_quant(d: dict[str, Any]) -> QuantConfig | None:
    q = d.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError("quantization_config", "must be an object", q)
    method = q.get("quant_method")
    if method == "compressed-tensors":
        fmt = q.get("format")
        if fmt != "pack-quantized":
            raise ConfigError("quantization_config.format", "only 'pack-quantized' is supported", fmt)
        groups = q.get("config_groups") or {}
        if len(groups) != 1:
            raise ConfigError(
                "quantization_config.config_groups", "exactly one group is supported", len(groups)
            )
        weights = next(iter(groups.values())).get("weights") or {}
        if weights.get("type", "int") != "int" or not weights.get("symmetric", True):
            raise ConfigError(
                "quantization_config.weights", "only symmetric int weights are supported", weights
            )
        if weights.get("strategy", "group") != "group":
            raise ConfigError(
                "quantization_config.weights.strategy", "only 'group' is supported", weights.get("strategy")
            )
        return QuantConfig(
            method="int4",
            num_bits=int(weights.get("num_bits", 4)),
            group_size=int(weights.get("group_size", 32)),
            ignore=tuple(q.get("ignore") or ()),
            raw=q,
        )
    if method == "fp8":
        if q.get("fmt", "e4m3") != "e4m3":
            raise ConfigError("quantization_config.fmt", "only e4m3 is supported", q.get("fmt"))
        bs = q.get("weight_block_size", [128, 128])
        if not (isinstance(bs, list) and len(bs) == 2):
            raise ConfigError("quantization_config.weight_block_size", "must be [rows, cols]", bs)
        return QuantConfig(method="fp8", block_size=(int(bs[0]), int(bs[1])), raw=q)
    raise ConfigError("quantization_config.quant_method", "unsupported", method)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one DeepSeek-V3-family model, validated on construction."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    quant: QuantConfig | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError("model_type", f"must be one of {SUPPORTED_MODEL_TYPES}", self.model_type)
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                "num_experts_per_tok",
                f"exceeds n_routed_experts={self.n_routed_experts}",
                self.num_experts_per_tok,
            )
        if self.n_group < 1 or self.n_routed_experts % self.n_group:
            raise ConfigError(
                "n_group", f"must divide n_routed_experts={self.n_routed_experts}", self.n_group
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError("topk_group", f"must be in [1, n_group={self.n_group}]", self.topk_group)
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ConfigError(
                "n_group", "each group needs >= 2 experts (groups are scored by their top-2)", self.n_group
            )
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError(
                "first_k_dense_replace",
                f"exceeds num_hidden_layers={self.num_hidden_layers}",
                self.first_k_dense_replace,
            )
        if self.qk_rope_head_dim % 2:
            raise ConfigError("qk_rope_head_dim", "must be even", self.qk_rope_head_dim)
        if self.rms_norm_eps <= 0:
            raise ConfigError("rms_norm_eps", "must be > 0", self.rms_norm_eps)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the normalised latent plus the rotated shared k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim**-0.5, times mscale(factor, mscale_all_dim)**2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        r = self.rope
        if r.kind == "yarn" and r.mscale_all_dim and r.factor > 1:
            m = 0.1 * r.mscale_all_dim * math.log(r.factor) + 1.0
            scale *= m * m
        return scale

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts from the architecture alone: total, active per token, and parts."""
        h, heads = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * heads * self.qk_head_dim
        else:
            q = h * heads * self.qk_head_dim
        attn = (
            q
            + h * self.kv_cache_dim
            + self.kv_lora_rank
            + self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
            + heads * self.v_head_dim * h
        )
        norms = 2 * h
        dense_mlp = 3 * h * self.intermediate_size
        expert = 3 * h * self.moe_intermediate_size
        router = self.n_routed_experts * h + self.n_routed_experts
        shared = self.n_shared_experts * expert
        n_dense, n_moe = self.first_k_dense_replace, self.num_moe_layers
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        common = (
            (n_dense + n_moe) * (attn + norms)
            + n_dense * dense_mlp
            + n_moe * (router + shared)
            + embed
            + head
            + h
        )
        routed_total = n_moe * self.n_routed_experts * expert
        routed_active = n_moe * self.num_experts_per_tok * expert
        return {
            "total": common + routed_total,
            "active": common + routed_active,
            "routed_experts": routed_total,
            "attention": (n_dense + n_moe) * attn,
            "embeddings": embed + head,
        }

    # ---- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError("<root>", "config must be a JSON object", type(d).__name__)
        model_type = d.get("model_type")
        if model_type is None:
            raise ConfigError("model_type", "is missing")
        n_routed = _int(d, "n_routed_experts", minimum=1)
        q_lora = d.get("q_lora_rank")
        if q_lora is not None:
            q_lora = _int(d, "q_lora_rank", minimum=1)
        eos = d.get("eos_token_id")
        return cls(
            model_type=str(model_type),
            vocab_size=_int(d, "vocab_size", minimum=1),
            hidden_size=_int(d, "hidden_size", minimum=1),
            intermediate_size=_int(d, "intermediate_size", minimum=1),
            moe_intermediate_size=_int(d, "moe_intermediate_size", minimum=1),
            num_hidden_layers=_int(d, "num_hidden_layers", minimum=1),
            num_attention_heads=_int(d, "num_attention_heads", minimum=1),
            q_lora_rank=q_lora,
            kv_lora_rank=_int(d, "kv_lora_rank", minimum=1),
            qk_nope_head_dim=_int(d, "qk_nope_head_dim", minimum=1),
            qk_rope_head_dim=_int(d, "qk_rope_head_dim", minimum=2),
            v_head_dim=_int(d, "v_head_dim", minimum=1),
            n_routed_experts=n_routed,
            n_shared_experts=_int(d, "n_shared_experts", 0),
            num_experts_per_tok=_int(d, "num_experts_per_tok", minimum=1),
            n_group=_int(d, "n_group", 1, minimum=1),
            topk_group=_int(d, "topk_group", 1, minimum=1),
            first_k_dense_replace=_int(d, "first_k_dense_replace", 0),
            routed_scaling_factor=_float(d, "routed_scaling_factor", 1.0),
            norm_topk_prob=bool(d.get("norm_topk_prob", True)),
            rms_norm_eps=_float(d, "rms_norm_eps", 1e-6),
            max_position_embeddings=_int(d, "max_position_embeddings", minimum=1),
            rope=_parse_rope(d),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
            quant=_parse_quant(d),
            raw=dict(d),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError as e:
            raise ConfigError("config.json", f"not found at {p}") from e
        except json.JSONDecodeError as e:
            raise ConfigError("config.json", f"is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def to_hf_dict(self) -> dict[str, Any]:
        """A dict that `transformers.DeepseekV3Config(**d)` accepts (legacy rope_scaling form)."""
        d: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in ("rope", "quant", "raw")}
        d["model_type"] = "deepseek_v3"
        d["architectures"] = ["DeepseekV3ForCausalLM"]
        d["rope_theta"] = self.rope.theta
        d["num_key_value_heads"] = self.num_attention_heads
        d["hidden_act"] = "silu"
        d["topk_method"] = "noaux_tc"
        d["scoring_func"] = "sigmoid"
        d["moe_layer_freq"] = 1
        d["rope_interleave"] = True
        d["attention_bias"] = False
        if self.rope.kind == "yarn":
            r = self.rope
            d["rope_scaling"] = {
                "type": "yarn",
                "rope_type": "yarn",
                "factor": r.factor,
                "original_max_position_embeddings": r.original_max_position_embeddings,
                "beta_fast": r.beta_fast,
                "beta_slow": r.beta_slow,
                "mscale": r.mscale,
                "mscale_all_dim": r.mscale_all_dim,
            }
        else:
            d["rope_scaling"] = None
        if self.quant is not None:
            d["quantization_config"] = self.quant.raw
        return d
