"""A captured decode step: pure 1-token decode batches through a static-shape forward, compiled or
captured once per (batch bucket, blocks bucket).

A batch-1 decode step of a small model is dispatch-bound: ~1,500 small torch ops whose Python and
launch overhead is far more than the time to read the weights. vLLM's answer, taken here: pad a
decode batch to a bucket of rows (1, 2, 4, 8, ... up to max_num_seqs) and its block tables to a bucket
of blocks (a power of two), and run a forward whose every shape is fixed by the bucket, with no
data-dependent Python: static inputs are token ids [B], positions [B], KV slots [B] and block tables
[B, NB]. The forward it runs:

- attention (`StaticDecodeAttention`): writes the new latent at the rows' slots, gathers each row's
  keys by its padded block table ([B, NB * block_size] keys) and attends absorbed over the latent,
  masking keys past the row's position (a padded block's keys sit past every real position); in bf16
  on a CPU with k2serve's native kernels, up to `compiled_gemv.NATIVE_ATTENTION_MAX_ROWS` rows, one
  `cpu_kernels.mla_decode` call a layer that reads the keys in place instead;
- routed experts (`RoutedExperts.forward_static`): top-k routing, then on CPU at few (token, expert)
  rows per-row GEMVs over the weights indexed by the ids (model/compiled_gemv.py), else one grouped
  GEMM over the rows sorted by expert with device-side offsets (no `.tolist()`), or a dense loop over
  the static expert count where torch's grouped GEMM does not apply;
- a speculative row verifying d drafts: 1 + d decode rows (positions start .. start + d over the same
  block table; the latents are all written before any row attends, which is the causal mask);
- the logits of all B rows; sampling stays outside (it is per-request Python: penalties, grammars,
  generators), on the first n rows.

Padding rows: token 0 at position 0, KV slot = the engine's scratch slot (a block no sequence owns),
block table = that scratch block; they write only there and attend only to it, and no real row
reads it, so they never change real rows' outputs.

On CPU each bucket's forward is compiled by torch.compile (Inductor, `dynamic=False`, full graph) on
first use, logged with its compile time, with the small-batch kernels of model/compiled_gemv.py
(prepacked bf16 linears, gathered expert GEMVs; `gemv`, on by default); Inductor's FX-graph and AOT caches (TORCHINDUCTOR_CACHE_DIR,
by default ~/.cache/k2serve/inductor) make a restart's compiles faster. On CUDA the same static
buffers are captured into a `torch.cuda.CUDAGraph` per bucket and replayed. All padding and
static-buffer code is shared, so the CPU tests exercise everything but the capture call itself.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from k2serve.kvcache.pool import KVCachePool
from k2serve.model import compiled_gemv, cpu_kernels
from k2serve.model.cpu_linear import PrepackedLinear, packed_layers
from k2serve.model.mla import MLA
from k2serve.model.model import K2Model
from k2serve.model.moe import MoE, RoutedExperts

logger = logging.getLogger(__name__)

INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"

MAX_GATHER_BYTES = 256 << 20
"""A captured step gathers every row's whole context per layer; above this many bytes it runs eager."""


def default_inductor_cache() -> Path:
    """Where Inductor's caches go unless TORCHINDUCTOR_CACHE_DIR says otherwise."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "k2serve" / "inductor"


def use_inductor_cache() -> None:
    """Point Inductor's caches at `default_inductor_cache()` unless the user chose a directory. Torch
    writes its own default (/tmp/torchinductor_$USER) into TORCHINDUCTOR_CACHE_DIR the first time any
    of its code asks (loading a checkpoint may), so that value counts as unset; Inductor reads the
    variable on every use, so setting it before the first compile is enough."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get(INDUCTOR_CACHE_ENV)
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ[INDUCTOR_CACHE_ENV] = str(default_inductor_cache())


def capture_sizes(max_rows: int) -> list[int]:
    """The batch buckets: powers of two from 1 up to the first that holds max_rows rows."""
    sizes = [1]
    while sizes[-1] < max_rows:
        sizes.append(sizes[-1] * 2)
    return sizes


def blocks_bucket(n: int) -> int:
    """The blocks-per-row bucket of a batch whose longest row needs n blocks: the smallest power of two
    >= n, at least 2 (torch.compile specialises a dimension of size 1, so 2 keeps one graph)."""
    return max(2, 1 << max(0, n - 1).bit_length())


def fused_in_capture(experts: RoutedExperts, pool: KVCachePool) -> bool:
    """Whether a layer's routed experts run their fused Triton kernels inside the captured step: on CUDA
    with --moe-backend triton (`fused_moe` aligns rows by expert on the device, no host sync, and takes
    INT4 or dense weights), where a CUDA graph records the kernel launches. On CPU the step is compiled
    by Inductor, which does not trace the interpreter's kernels: `forward_static` instead."""
    return experts.moe_backend == "triton" and pool.kv.device.type == "cuda"


def int4_native_in_capture(experts: RoutedExperts, pool: KVCachePool) -> bool:
    """Whether a layer's INT4 experts run the native CPU kernel inside the captured step
    (`RoutedExperts.int4_native_capturable`, with the small-batch kernels on): then only the batch
    buckets whose (token, expert) rows fit `compiled_gemv.native_int4_rows` are captured (`int4_max_rows`)."""
    return pool.kv.device.type == "cpu" and compiled_gemv.DEFAULT_ON and experts.int4_native_capturable()


def int4_max_rows(model: K2Model) -> int | None:
    """The most rows a captured step takes when INT4 experts run the native kernels in it (their
    (token, expert) row limit over the model's top-k), else None (no limit)."""
    if not any(
        isinstance(layer.mlp, MoE)
        and layer.mlp.experts.int4_group_size is not None
        and layer.mlp.experts.moe_backend != "triton"
        for layer in model.layers
    ):
        return None
    rows = compiled_gemv.NATIVE_INT4_MAX_ROWS_PER_EXPERT * model.config.n_routed_experts
    return max(1, rows // model.config.num_experts_per_tok)


def unsupported_reason(model: K2Model, pool: KVCachePool) -> str | None:
    """Why the captured step cannot serve this model and pool (None: it can)."""
    for layer in model.layers:
        mlp = layer.mlp
        if isinstance(mlp, MoE):
            if mlp.dispatch is not None:
                return "expert-parallel dispatch (collectives per step) is not captured"
            experts = mlp.experts
            if experts.int4_group_size is not None and not (
                fused_in_capture(experts, pool) or int4_native_in_capture(experts, pool)
            ):
                return (
                    "INT4 experts are captured on CUDA with --moe-backend triton (the fused kernels, no "
                    "host sync) or on a CPU with the native kernels (bf16, torch's CPU int4 tiles, "
                    f"AVX512-BF16; here: {cpu_kernels.unavailable_reason() or 'not these weights'}); "
                    "here they have no static-shape path"
                )
            if mlp.experts.num_local != mlp.experts.n_global:
                return "a subset of the routed experts (expert parallelism) is not captured"
    if pool.fp8 is not None:
        return "an fp8 KV cache is not captured"
    return None


@dataclass
class StaticInputs:
    """The static buffers of one bucket: rows [B], blocks per row NB."""

    input_ids: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B] long
    slots: torch.Tensor  # [B] long: the KV slot each row's new latent goes to
    block_tables: torch.Tensor  # [B, NB] long: padded with the scratch block

    @classmethod
    def empty(cls, batch: int, blocks: int, device: torch.device) -> StaticInputs:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.long, device=device)

        return cls(z(batch), z(batch), z(batch), z(batch, blocks))

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def blocks(self) -> int:
        return self.block_tables.shape[1]

    def fill(self, rows: Seq[DecodeRow], pool: KVCachePool, pad_slot: int) -> None:
        """Copy `rows` (at most `batch`) into the buffers in place; the rest become padding rows that
        write `pad_slot` and read only its block."""
        n, bs = len(rows), pool.block_size
        pad_block = pad_slot // bs
        ids = [r.token_id for r in rows] + [0] * (self.batch - n)
        pos = [r.position for r in rows] + [0] * (self.batch - n)
        slots = [r.block_table[r.position // bs] * bs + r.position % bs for r in rows]
        slots += [pad_slot] * (self.batch - n)
        table = torch.full((self.batch, self.blocks), pad_block, dtype=torch.long)
        for i, r in enumerate(rows):
            used = r.position // bs + 1
            table[i, :used] = torch.tensor(r.block_table[:used], dtype=torch.long)
        self.input_ids.copy_(torch.tensor(ids, dtype=torch.long), non_blocking=True)
        self.positions.copy_(torch.tensor(pos, dtype=torch.long), non_blocking=True)
        self.slots.copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)
        self.block_tables.copy_(table, non_blocking=True)


@dataclass(frozen=True)
class DecodeRow:
    """One decode row: its token at `position` (its context is [0, position]) and its block table."""

    token_id: int
    position: int
    block_table: Seq[int]


class StaticDecodeAttention:
    """The attention backend of the captured step: static shapes, no host sync."""

    def __init__(self, pool: KVCachePool, inputs: StaticInputs) -> None:
        self.pool = pool
        self.inputs = inputs

    def __call__(
        self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor
    ) -> torch.Tensor:
        """q_nope [B, H, dn], q_pe [B, H, dr], latent [B, C + dr] -> [B, H, dv]: absorbed attention of
        each row over keys [0, position] read through its padded block table."""
        layer, inp = mla.layer_idx, self.inputs
        kv = self.pool.kv[layer]  # [num_blocks, block_size, C + dr]
        # written into the pool tensor itself by (layer, block, offset), not through a view of it:
        # Inductor keeps an index_put_ on a graph input in place, while a write through the layer's view
        # (`layer_rows(layer).index_copy_`) compiled to a copy of the layer and of the whole pool back on
        # every step (O(pool bytes) per step: 2 GiB of a default-sized pool, ~4 s a token here)
        bs = self.pool.block_size
        where = (torch.full_like(inp.slots, layer), inp.slots // bs, inp.slots % bs)
        self.pool.kv.index_put_(where, latent.to(kv.dtype))
        if compiled_gemv.native_attention(q_nope.dtype, kv.dtype, q_nope.shape[0], mla.kv_rank):
            wkv = mla.kv_b_proj.weight
            q_nope, q_pe = q_nope.contiguous(), q_pe.contiguous()  # splits of one projection's output
            return cpu_kernels.mla_decode(
                q_nope, q_pe, self.pool.kv, layer, inp.block_tables, inp.positions, wkv, mla.softmax_scale
            )
        return absorbed_attention(mla, q_nope, q_pe, kv, inp.block_tables, inp.positions)


def absorbed_attention(
    mla: MLA,
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    block_tables: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """q_nope [B, H, dn], q_pe [B, H, dr] -> [B, H, dv]: absorbed attention of each row over the keys
    [0, position] of one layer's latent pool kv [blocks, bs, C + dr], gathered through its padded block
    table [B, NB] (`cpu_kernels.mla_decode` computes the same with the same roundings)."""
    b, c = q_nope.shape[0], mla.kv_rank
    keys = kv[block_tables].flatten(1, 2).to(q_nope.dtype)  # [B, K, C + dr]
    w_uk, w_uv = mla.absorb_weights()
    q_lat = torch.einsum("bhd,hdc->bhc", q_nope, w_uk)
    query = torch.cat((q_lat, q_pe), dim=-1)  # [B, H, C + dr]
    scores = torch.bmm(query, keys.transpose(1, 2)).float() * mla.softmax_scale  # [B, H, K]
    key_pos = torch.arange(keys.shape[1], device=keys.device)
    future = key_pos[None, :] > positions[:, None]  # [B, K]
    p = torch.softmax(scores.masked_fill(future[:, None, :], float("-inf")), dim=-1)
    # over the whole latent rows, then the first C columns: a bmm on `keys[..., :c]` made Inductor
    # copy the strided slice first ([B, K, C]: 0.6 ms a layer at batch 64 of `small`; the step's
    # median 114.5 -> 105.8 ms in 3 alternating runs, the rope columns' 12% more products included)
    o_lat = torch.bmm(p.to(keys.dtype), keys)[..., :c]  # [B, H, C]
    return torch.einsum("bhc,hdc->bhd", o_lat, w_uv).view(b, mla.n_heads, mla.v_dim)


StepFn = Callable[[], torch.Tensor]


@dataclass
class Bucket:
    """One captured shape: its buffers and how to run it (compiled forward, or a graph's replay)."""

    inputs: StaticInputs
    run: StepFn
    seconds: float  # compile / capture time


class CapturedDecode:
    """Serves pure 1-token decode steps through per-bucket static forwards (see the module docstring).

    `accepts(rows)` says whether a step can go this way; `run(rows)` returns the fp32 logits [n, V]
    of the n rows, the same contract as `ModelRunner.run` for such rows.
    """

    def __init__(
        self,
        model: K2Model,
        pool: KVCachePool,
        pad_slot: int,
        max_rows: int,
        max_blocks_per_seq: int,
        compile: bool = True,
        gemv: bool | None = None,
    ) -> None:
        """`pad_slot`: the scratch slot padding rows write (its block is never a sequence's).
        `max_rows`: the most decode rows of a step (the engine's max_num_seqs, times 1 + the speculative
        tokens where drafts are verified: each verified position is a row).
        `compile`: False runs the CPU buckets' static forward eagerly (the tests' way to check the
        padding and static inputs without paying for Inductor); CUDA always captures.
        `gemv`: the CPU step's small-batch kernels (model/compiled_gemv.py: prepacked bf16 linears and
        gathered expert GEMVs) on or off; None: on unless K2SERVE_DECODE_GEMV=0."""
        self.model = model
        self.pool = pool
        self.pad_slot = pad_slot
        self.sizes = capture_sizes(max_rows)
        self.max_blocks = blocks_bucket(max(1, max_blocks_per_seq))
        self.device = pool.kv.device
        self.buckets: dict[tuple[int, int], Bucket] = {}
        self.steps = 0  # steps served captured (tests and metrics read it)
        self.gemv = (compiled_gemv.DEFAULT_ON if gemv is None else gemv) and self.device.type == "cpu"
        limit = int4_max_rows(model) if self.device.type == "cpu" else None
        if limit is not None:  # INT4 experts through the native kernel: its row limit bounds the buckets
            if not self.gemv:
                raise ValueError("INT4 experts are captured on CPU only with the small-batch kernels on")
            self.sizes = [s for s in self.sizes if s <= limit]
        self._packed: list[PrepackedLinear] = []  # the packed linears a compiled step reads
        if self.device.type == "cpu":
            use_inductor_cache()
            # one compiled graph per bucket: more than dynamo's default 8 recompiles of the same code
            dyn = torch._dynamo.config  # noqa: SLF001
            dyn.recompile_limit = max(dyn.recompile_limit, len(self.sizes) * 16)
            # static shapes but for the blocks-per-row dimension (marked dynamic on each bucket's
            # block table): one compile per batch bucket serves every context length
            self._compiled = (
                torch.compile(self._forward, dynamic=None, fullgraph=True) if compile else self._forward
            )

    def bucket_key(self, rows: Seq[DecodeRow]) -> tuple[int, int]:
        """(rows bucket, blocks bucket) of a batch."""
        batch = next(s for s in self.sizes if s >= len(rows))
        blocks = blocks_bucket(max(r.position // self.pool.block_size + 1 for r in rows))
        return batch, blocks

    def accepts(self, rows: Seq[DecodeRow]) -> bool:
        """Whether this step can run captured: at most the largest bucket of rows, and keys gathered per
        layer (bucket rows x bucket blocks, whole contexts: no split-K here) within MAX_GATHER_BYTES;
        a longer batch runs eager, whose tiles bound its memory."""
        if not 0 < len(rows) <= self.sizes[-1]:
            return False
        batch, blocks = self.bucket_key(rows)
        row_bytes = self.pool.row_width * self.pool.kv.element_size()
        return batch * blocks * self.pool.block_size * row_bytes <= MAX_GATHER_BYTES

    def _forward(self, inputs: StaticInputs) -> torch.Tensor:
        """The static forward: logits [B, V] fp32 of every (padded) row."""
        attention = StaticDecodeAttention(self.pool, inputs)
        hidden = self.model.forward_hidden(inputs.input_ids, inputs.positions, attention)
        return self.model.logits(hidden)

    def _build(self, batch: int, blocks: int, rows: Seq[DecodeRow]) -> Bucket:
        inputs = StaticInputs.empty(batch, blocks, self.device)
        inputs.fill(rows, self.pool, self.pad_slot)
        if self.device.type == "cuda" or not any(b == batch for b, _ in self.buckets):
            what = "capturing" if self.device.type == "cuda" else "compiling"
            logger.info("%s decode step for batch %d x %d blocks ...", what, batch, blocks)
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            run = self._capture_cuda(inputs)
        else:
            torch._dynamo.mark_dynamic(inputs.block_tables, 1)  # noqa: SLF001
            if self.gemv:  # one eager step packs the linears it runs (packing is not traced)
                with compiled_gemv.options(True):
                    self._forward(inputs)
                self._packed = packed_layers(self.model)

            def run() -> torch.Tensor:
                for layer in self._packed:  # repacks a weight changed in place (a version check)
                    layer.packed_weight()
                with compiled_gemv.options(self.gemv):
                    return self._compiled(inputs)

            # compiles this batch bucket's graph (on its first blocks bucket); without dynamo's
            # automatic dynamic shapes, which would make the batch dimension symbolic on the 2nd bucket
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False):  # noqa: SLF001
                run()
        seconds = time.perf_counter() - t0
        logger.info("decode step for batch %d x %d blocks ready: %.1f s", batch, blocks, seconds)
        return Bucket(inputs, run, seconds)

    def _capture_cuda(self, inputs: StaticInputs) -> StepFn:
        """A CUDA graph of the static forward over `inputs`' buffers; the step replays it. The
        buffers must already hold valid rows: warm-up runs write the pool like a real step."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up off the capture (lazy inits, cuBLAS workspaces)
                self._forward(inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool()):
            out = self._forward(inputs)

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    def _graph_pool(self) -> Any:  # torch's graph-pool handle (an opaque tuple)
        if not hasattr(self, "_mempool"):
            self._mempool = torch.cuda.graph_pool_handle()
        return self._mempool

    @torch.inference_mode()
    def run(self, rows: Seq[DecodeRow]) -> torch.Tensor:
        """fp32 logits [len(rows), V] of one decode step of `rows` (each row's latent goes into the pool)."""
        batch, blocks = self.bucket_key(rows)
        key = (batch, blocks)
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = self._build(batch, blocks, rows)
        else:
            b.inputs.fill(rows, self.pool, self.pad_slot)
        self.steps += 1
        return b.run()[: len(rows)].clone()
