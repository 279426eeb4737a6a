"""The engine's configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from k2serve.kvcache.fp8 import CACHE_DTYPES
from k2serve.kvcache.shared_tier import parse_host_port
from k2serve.model.triton_attention import ATTENTION_BACKENDS
from k2serve.model.triton_moe import MOE_BACKENDS

COMPILE_MODES = ("none", "decode")
"""EngineConfig.compile: "none" (eager every step) or "decode" (the captured decode step)."""

DEFAULT_KV_CACHE_BYTES = 1 << 30  # the pool when neither kv_cache_bytes nor memory_budget_bytes is given
KV_STORES = ("none", "mooncake")  # the shared KV tier (kvcache/shared_tier.py)
DEFAULT_KV_STORE_SEGMENT_BYTES = 512 << 20


class EngineConfigError(ValueError):
    pass


def resolve_device(spec: str | torch.device | None, check_available: bool = True) -> torch.device:
    """The device `--device` names: "cpu", "cuda" or "cuda:N"; None: cuda when torch sees a GPU, else cpu.

    EngineConfigError (naming the flag) for anything else and, with `check_available`, for cuda on a
    machine where torch sees no GPU and for an index past the GPUs present (checked before any weight
    is read; a config alone, e.g. one a chart renders, is checked for its spelling only).
    """
    if spec is None or spec == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise EngineConfigError(f"--device must be cpu, cuda or cuda:N, got {spec!r}") from e
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise EngineConfigError(f"--device must be cpu, cuda or cuda:N, got {spec!r}")
    if not check_available:
        return device
    if not torch.cuda.is_available():
        raise EngineConfigError(
            f"--device {spec}: torch sees no CUDA device on this machine (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); use --device cpu"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise EngineConfigError(
            f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return device


def indexed_device(device: torch.device) -> torch.device:
    """device with its index, as tensors report theirs: a bare "cuda" is the current CUDA device (where
    tensors made on "cuda" land). NCCL binds to an indexed device, and a receive lands in place only
    when its destination's device equals the receiver's."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


SPEC_METHODS = ("ngram", "suffix")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Model-free speculative decoding (vLLM's `speculative_config`): each decode step proposes up to
    `num_speculative_tokens` draft tokens and verifies them in one forward pass; the output is the
    same as without it (greedy: token for token; sampled: in distribution, by rejection sampling).

    method "ngram" (prompt lookup): the longest suffix of the sequence so far, between
    `prompt_lookup_min` and `prompt_lookup_max` tokens, that occurred earlier in it proposes the tokens
    that followed that earlier occurrence (engine/spec_decode.py).

    method "suffix" (suffix decoding, vLLM's keys): suffix trees with occurrence counts over the
    request's prompt + output and over the outputs of the last `suffix_decoding_max_cached_requests`
    requests (0: only the request's own tree), at most `suffix_decoding_max_tree_depth` tokens deep
    (match + draft). The draft follows the most frequent continuation of a matching suffix of length
    L, at most `suffix_decoding_max_spec_factor` x L tokens (and num_speculative_tokens), while the
    counts give each token a probability >= `suffix_decoding_min_token_prob`; the match with the
    highest expected accepted count wins (engine/spec_decode.py). prompt_lookup_* are ngram's only.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    suffix_decoding_max_cached_requests: int = 32
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_spec_factor: float = 1.0
    suffix_decoding_min_token_prob: float = 0.1

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise EngineConfigError(
                f"speculative_config.method must be one of {', '.join(SPEC_METHODS)}, got {self.method!r}"
            )
        for name in (
            "num_speculative_tokens",
            "prompt_lookup_max",
            "prompt_lookup_min",
            "suffix_decoding_max_tree_depth",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EngineConfigError(f"speculative_config.{name} must be an integer >= 1, got {value!r}")
        cached = self.suffix_decoding_max_cached_requests
        if not isinstance(cached, int) or isinstance(cached, bool) or cached < 0:
            raise EngineConfigError(
                f"speculative_config.suffix_decoding_max_cached_requests must be an integer >= 0, got {cached!r}"
            )
        for name, low, high in (
            ("suffix_decoding_max_spec_factor", 0.0, 1024.0),
            ("suffix_decoding_min_token_prob", 0.0, 1.0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise EngineConfigError(
                    f"speculative_config.{name} must be a number in [{low}, {high}], got {value!r}"
                )
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise EngineConfigError(
                f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )

    @classmethod
    def parse(cls, value: SpeculativeConfig | Mapping[str, Any] | str | None) -> SpeculativeConfig | None:
        """A SpeculativeConfig from a dict (vLLM's `speculative_config`), its JSON text (the
        --speculative-config flag) or None (off); raises EngineConfigError naming the bad field."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise EngineConfigError(f"speculative_config is not valid JSON: {e}") from e
        if not isinstance(value, Mapping):
            raise EngineConfigError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise EngineConfigError(
                f"speculative_config has unknown field(s) {unknown}; known: {', '.join(sorted(known))}"
            )
        if "method" not in value:
            raise EngineConfigError(
                f"speculative_config.method is required (one of: {', '.join(SPEC_METHODS)})"
            )
        return cls(**value)

    def to_json(self) -> str:
        """The JSON text `parse` reads back (what `up` passes on to its workers)."""
        return json.dumps({name: getattr(self, name) for name in self.__dataclass_fields__})


@dataclass(frozen=True)
class EngineConfig:
    """Sizes of the single-node engine.

    block_size: token positions per KV block. The latent pool is sized by one of: num_kv_blocks;
    kv_cache_bytes (bytes; default DEFAULT_KV_CACHE_BYTES); memory_budget_bytes, the memory of this
    rank for weights + activations + KV: the pool gets what is left after the loaded weights and a
    profiled activation peak (engine/kv_sizing.py). max_num_seqs: running sequences at most.
    max_num_batched_tokens: tokens computed per step (chunked prefill splits prompts to fit).
    kv_cache_dtype: what the pool stores, one of CACHE_DTYPES: "auto" (the model's dtype), "bf16",
    "fp32", or "fp8" (e4m3 c_kv with a per-token scale + bf16 RoPE keys, kvcache/fp8.py).
    speculative_config: a SpeculativeConfig (or the dict / JSON text `SpeculativeConfig.parse`
    reads), or None: no speculative decoding.
    attention_backend: one of ATTENTION_BACKENDS: "torch" (the tiled reference) or "triton" (the paged
    attention's work items through the Triton kernels, model/triton_attention.py: needs CUDA or
    TRITON_INTERPRET=1, checked when the engine is built; an fp8 pool stays torch).
    kv_offload_host_bytes / kv_offload_dir / kv_offload_disk_bytes: the local tiers below the pool
    (kvcache/tiers.py): evicted prefix-cache blocks go to a host-memory LRU of that many bytes, blocks
    pushed out of it to one checksummed file per block in kv_offload_dir (at most kv_offload_disk_bytes),
    and a prefix hit there is reloaded instead of recomputed. 0 / None: no such tier.
    kv_offload_async: disk writes and reloads on background threads, overlapped with the engine's steps
    (a request whose prefix is being reloaded waits, the others run); False: inside the step.
    kv_reload_timeout_s: an asynchronous reload not done after this many seconds is given up: the
    request computes those tokens instead. kv_offload_queue_blocks: disk writes queued at most; an
    offload that finds the queue full is dropped (counted), never waited for.
    kv_store / kv_store_master / kv_store_metadata / kv_store_segment_bytes / kv_store_put_on_compute /
    kv_store_local_hostname / kv_store_timeout_s: the shared tier below the local ones
    (kvcache/shared_tier.py): "mooncake" puts prefix-cache blocks into a Mooncake Store whose master is
    at kv_store_master (HOST:PORT; metadata server kv_store_metadata, default
    http://MASTER_HOST:8080/metadata), to which this engine gives kv_store_segment_bytes of memory and
    is reachable at kv_store_local_hostname (default: this host's address); a prefix miss in the local
    tiers is fetched from it. With kv_store_put_on_compute (the default) a block is put as soon as it is
    computed, so other workers hit it before this one evicts it; else only on eviction. No store call
    stalls a step longer than kv_store_timeout_s. "none": no shared tier.
    kv_session_lease_s: after a turn of a request with a session_id finishes, its blocks stay
    referenced (not evictable) until this many seconds pass or the session's next turn arrives
    (an agent's tool call between turns); 0 disables leases.
    moe_backend: one of MOE_BACKENDS: "torch" (per-expert loops / torch grouped GEMMs) or "triton" (the
    routed experts through the fused Triton MoE kernels, model/triton_moe.py, the routing's gather and
    weighted sum inside them: INT4 experts in the compressed-tensors layout, bf16/fp32 dense experts;
    same CUDA-or-TRITON_INTERPRET=1 check).
    device: where weights, the KV pool, the step inputs and the sampler live: "cpu", "cuda" or "cuda:N";
    None (the default): cuda when torch sees a GPU, else cpu (`resolve_device`: spelled right, checked
    here; present on this machine, checked by `torch_device` when the engine loads).
    compile: one of COMPILE_MODES: "none" (every step eager) or "decode" (steps of only 1-token decode
    rows run a static-shape forward per batch bucket: torch.compile on CPU, CUDA graphs on CUDA;
    engine/captured.py; other steps stay eager).
    max_model_len: prompt + output tokens at most (default: the model's max_position_embeddings, or
    less when a pool sized by bytes or blocks holds less). Startup refuses a pool that cannot hold one
    max_model_len sequence.
    """

    block_size: int = 16
    kv_cache_bytes: int | None = None
    num_kv_blocks: int | None = None
    memory_budget_bytes: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    max_waiting: int = 4096
    kv_cache_dtype: str = "auto"
    speculative_config: SpeculativeConfig | None = None
    attention_backend: str = "torch"
    kv_offload_host_bytes: int = 0
    kv_offload_dir: str | None = None
    kv_offload_disk_bytes: int = 0
    kv_offload_async: bool = True
    kv_reload_timeout_s: float = 10.0
    kv_offload_queue_blocks: int = 256
    kv_session_lease_s: float = 0.0
    kv_store: str = "none"
    kv_store_master: str | None = None
    kv_store_metadata: str | None = None
    kv_store_segment_bytes: int = DEFAULT_KV_STORE_SEGMENT_BYTES
    kv_store_put_on_compute: bool = True
    kv_store_local_hostname: str | None = None
    kv_store_timeout_s: float = 1.0
    moe_backend: str = "torch"
    device: str | None = None
    compile: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("kv_cache_bytes", "num_kv_blocks", "memory_budget_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EngineConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        given = [n for n in ("kv_cache_bytes", "num_kv_blocks", "memory_budget_bytes") if getattr(self, n)]
        if len(given) > 1:
            raise EngineConfigError(
                f"give one of kv_cache_bytes, num_kv_blocks, memory_budget_bytes, got {given}"
            )
        if self.kv_cache_dtype not in CACHE_DTYPES:
            raise EngineConfigError(
                f"kv_cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise EngineConfigError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )
        for name in ("kv_offload_host_bytes", "kv_offload_disk_bytes", "kv_session_lease_s"):
            if getattr(self, name) < 0:
                raise EngineConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.kv_reload_timeout_s <= 0:
            raise EngineConfigError(f"kv_reload_timeout_s must be > 0, got {self.kv_reload_timeout_s}")
        if self.kv_offload_queue_blocks < 1:
            raise EngineConfigError(
                f"kv_offload_queue_blocks must be >= 1, got {self.kv_offload_queue_blocks}"
            )
        if self.kv_offload_disk_bytes and not self.kv_offload_dir:
            raise EngineConfigError("kv_offload_disk_bytes needs kv_offload_dir (the disk tier's directory)")
        self._check_kv_store()
        if self.moe_backend not in MOE_BACKENDS:
            raise EngineConfigError(
                f"moe_backend must be one of {', '.join(MOE_BACKENDS)}, got {self.moe_backend!r}"
            )
        resolve_device(self.device, check_available=False)
        if self.compile not in COMPILE_MODES:
            raise EngineConfigError(
                f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise EngineConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")

    def _check_kv_store(self) -> None:
        if self.kv_store not in KV_STORES:
            raise EngineConfigError(f"kv_store must be one of {', '.join(KV_STORES)}, got {self.kv_store!r}")
        if self.kv_store == "none":
            return
        if not self.kv_store_master:
            raise EngineConfigError("kv_store mooncake needs kv_store_master (--kv-store-master HOST:PORT)")
        try:
            parse_host_port(self.kv_store_master, "kv_store_master (--kv-store-master)")
        except ValueError as e:
            raise EngineConfigError(str(e)) from e
        if self.kv_store_segment_bytes < 1:
            raise EngineConfigError(f"kv_store_segment_bytes must be >= 1, got {self.kv_store_segment_bytes}")
        if self.kv_store_timeout_s <= 0:
            raise EngineConfigError(f"kv_store_timeout_s must be > 0, got {self.kv_store_timeout_s}")
        if not self.enable_prefix_caching:
            raise EngineConfigError("kv_store needs prefix caching (its blocks are keyed by prefix hash)")

    @property
    def kv_store_metadata_url(self) -> str:
        """kv_store_metadata, or the HTTP metadata server mooncake_master runs next to its RPC port."""
        if self.kv_store_metadata:
            return self.kv_store_metadata
        host, _ = parse_host_port(self.kv_store_master or "", "kv_store_master")
        return f"http://{f'[{host}]' if ':' in host else host}:8080/metadata"

    @property
    def torch_device(self) -> torch.device:
        """`device` resolved (the default picked): where `LLMEngine.from_pretrained` loads the weights."""
        return resolve_device(self.device)
