"""How many KV blocks the engine gets, and the longest sequence they can ever hold.

The pool comes from one of: `num_kv_blocks`; `kv_cache_bytes`; or `memory_budget_bytes`, the memory
of this rank for weights + activations + KV, as vLLM's `determine_num_available_blocks`: the pool gets
what is left after the loaded weights (their bytes, counted) and the activation peak of one forward of
`max_num_batched_tokens` tokens over `max_num_seqs` rows (the profile step, run at startup). On CUDA
the peak is the allocator's (`max_memory_allocated` during the forward, less the profile's own pool).
On CPU torch keeps no allocator statistics, so the peak is the larger of the capacity model's estimate
(`k2serve.capacity.memory.activation_bytes`, which assumes attention tiled over the context as
`Workload.attention_tile` says) and the growth of the process's peak RSS during the profile forward
(a lower bound of the true transient). On CUDA the budget is also capped by the device: the KV bytes
are at most what `torch.cuda.mem_get_info` reports free after the weights are loaded and the profile
ran, less the activation peak (`budget_kv_bytes`), so a budget larger than the GPU is refused, not
allocated past the device.

Startup refuses (EngineConfigError naming the numbers) when one max_model_len sequence does not fit
the pool. When max_model_len is not given and the pool was sized by bytes or blocks, it becomes the
pool's capacity if that is less than the model's positions (the engine can never run a longer one).
"""

from __future__ import annotations

import logging
import math
import resource
from dataclasses import dataclass

import torch

from k2serve.capacity.memory import Layout, Workload, activation_bytes, gib
from k2serve.engine.config import DEFAULT_KV_CACHE_BYTES, EngineConfig, EngineConfigError
from k2serve.engine.model_runner import ModelRunner, RowSpec
from k2serve.kvcache.fp8 import Fp8Layout, resolve_cache_dtype
from k2serve.kvcache.pool import KVCachePool
from k2serve.model.model import K2Model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVSizing:
    """num_blocks: blocks the block manager hands out (the pool has one more: the scratch block);
    max_model_len: the longest sequence served; weights / activations: bytes counted and profiled
    (0 when the pool was not sized from a budget); how: where the activation figure came from."""

    num_blocks: int
    max_model_len: int
    weights: int = 0
    activations: int = 0
    how: str = ""


def model_bytes(model: K2Model) -> int:
    """Bytes of the model's parameters and buffers as loaded (packed INT4 experts at their packed size)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def pool_format(model: K2Model, config: EngineConfig) -> tuple[torch.dtype, Fp8Layout | None]:
    """(value dtype, fp8 layout or None) of the pool `config.kv_cache_dtype` asks for: the pool's
    storage dtype is the value dtype, or uint8 rows of the fp8 layout (values come back in the
    model's dtype)."""
    mc = model.config
    dtype = resolve_cache_dtype(config.kv_cache_dtype, model.dtype)
    if dtype is None:
        return model.dtype, Fp8Layout(mc.kv_lora_rank, mc.qk_rope_head_dim)
    return dtype, None


def _device(model: K2Model) -> torch.device:
    return model.embed_tokens.weight.device


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@torch.inference_mode()
def profile_activations(model: K2Model, config: EngineConfig) -> tuple[int, str]:
    """(bytes, how): the transient memory of one forward of max_num_batched_tokens tokens spread over
    min(max_num_seqs, tokens) sampled rows, with a pool of its own that is freed afterwards."""
    mc, bs = model.config, config.block_size
    tokens = config.max_num_batched_tokens
    if config.max_model_len:
        tokens = min(tokens, config.max_model_len)
    rows_n = min(config.max_num_seqs, tokens)
    lengths = [tokens // rows_n + (1 if i < tokens % rows_n else 0) for i in range(rows_n)]
    blocks = [math.ceil(n / bs) for n in lengths]
    device = _device(model)
    dtype, fp8 = pool_format(model, config)
    pool = KVCachePool(mc.num_hidden_layers, sum(blocks) + 1, bs, mc.kv_cache_dim, dtype, device, fp8)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(mc.vocab_size, (tokens,), generator=gen).tolist()
    rows, first, at = [], 0, 0
    for n, b in zip(lengths, blocks, strict=True):
        rows.append(RowSpec(ids[at : at + n], 0, list(range(first, first + b)), True))
        first, at = first + b, at + n
    runner = ModelRunner(model, pool, pad_slot=sum(blocks) * bs)
    estimate = activation_bytes(
        mc,
        Layout(),
        Workload(
            max_model_len=max(tokens, 1),
            max_num_batched_tokens=tokens,
            max_num_seqs=rows_n,
            kv_bytes=1 if fp8 else pool.kv.element_size(),
            act_bytes=model.embed_tokens.weight.element_size(),
        ),
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        runner.run(rows)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del pool, runner
        torch.cuda.empty_cache()
        return peak, f"measured on {device} (allocator peak of a {tokens}-token forward)"
    before = _peak_rss_bytes()
    runner.run(rows)
    grown = _peak_rss_bytes() - before
    how = f"estimated on {device} for a {tokens}-token forward (peak RSS grew {grown} bytes)"
    return max(estimate, grown), how


def free_device_bytes(device: torch.device) -> int | None:
    """Free bytes on a CUDA `device` (`torch.cuda.mem_get_info`: other processes' use counts too);
    None on CPU, where the budget is the only bound."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def budget_kv_bytes(budget: int, weights: int, activations: int, free: int | None) -> tuple[int, str]:
    """(KV bytes, how they were found) of a memory budget: budget - weights - activations, and on a
    device with `free` bytes left after the weights (CUDA), no more than free - activations."""
    kv = budget - weights - activations
    how = f"memory budget {gib(budget)} - weights {gib(weights)} - activations {gib(activations)}"
    if free is not None and free - activations < kv:
        kv = free - activations
        how = f"device free {gib(free)} (after the weights) - activations {gib(activations)}"
    return kv, f"{how} = KV {gib(max(kv, 0))}"


def size_kv(model: K2Model, config: EngineConfig) -> KVSizing:
    """The pool's blocks and the max_model_len the engine serves; raises EngineConfigError when one
    max_model_len sequence cannot fit."""
    mc, bs = model.config, config.block_size
    positions = mc.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > positions:
        raise EngineConfigError(
            f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings {positions}"
        )
    per_block = KVCachePool.block_bytes(
        mc.num_hidden_layers, bs, mc.kv_cache_dim, *pool_format(model, config)
    )
    weights = activations = 0
    how = ""
    if config.num_kv_blocks is not None:
        num_blocks, source = config.num_kv_blocks, f"num_kv_blocks={config.num_kv_blocks}"
    elif config.memory_budget_bytes is not None:
        weights = model_bytes(model)
        activations, how = profile_activations(model, config)
        kv_bytes, source = budget_kv_bytes(
            config.memory_budget_bytes, weights, activations, free_device_bytes(_device(model))
        )
        num_blocks = max(kv_bytes, 0) // per_block - 1
    else:
        kv_bytes = config.kv_cache_bytes or DEFAULT_KV_CACHE_BYTES
        num_blocks, source = kv_bytes // per_block - 1, f"kv_cache_bytes={kv_bytes}"
    capacity = max(num_blocks, 0) * bs
    wanted = config.max_model_len
    if wanted is None and config.memory_budget_bytes is None:
        max_model_len = min(positions, capacity)
        if max_model_len < positions:
            logger.info("max_model_len %d: the KV pool (%s) holds no more", max_model_len, source)
    else:
        max_model_len = wanted or positions
    if num_blocks < 1 or capacity < max_model_len:
        need = math.ceil(max_model_len / bs) * per_block
        raise EngineConfigError(
            f"the KV pool cannot hold one {max_model_len}-token sequence: it needs {gib(need)} "
            f"({math.ceil(max_model_len / bs)} blocks of {per_block} bytes) but {source} leaves "
            f"{max(num_blocks, 0)} blocks ({capacity} tokens); lower max_model_len or give more memory"
        )
    return KVSizing(num_blocks, max_model_len, weights, activations, how)
