"""The engine loop: `step()` = schedule() -> run() -> postprocess().

Requests are validated in `add_request` before any work is done; a bad request raises
`RequestError` and never enters the batch. Every finished or aborted request returns its blocks.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from k2serve.chat.tokenizer import IncrementalDecoder, KimiTokenizer, load_tokenizer
from k2serve.config import ModelConfig
from k2serve.engine.captured import CapturedDecode, unsupported_reason
from k2serve.engine.config import EngineConfig, EngineConfigError
from k2serve.engine.kv_reservation import KVGeometry, KVReservation
from k2serve.engine.kv_sizing import pool_format, size_kv
from k2serve.engine.kv_tiers import AsyncReloads, EngineLeases, attach_tiers, close_tiers
from k2serve.engine.model_runner import ModelRunner, RowSpec
from k2serve.engine.protocol import InvalidRequestError
from k2serve.engine.sampler import Sampler, make_generator, skip_draw, suppress_tokens
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.scheduler import ScheduledChunk, Scheduler
from k2serve.engine.sequence import KVSink, RequestError, Sequence, SequenceStatus
from k2serve.engine.spec_decode import DraftBudget, Proposer
from k2serve.engine.validation import validate_request
from k2serve.kvcache.block_manager import BlockManager
from k2serve.kvcache.pool import KVCachePool
from k2serve.kvcache.tiers import CLOSE_TIMEOUT_S
from k2serve.model.loader import load_model
from k2serve.model.model import K2Model
from k2serve.model.moe import MoE
from k2serve.model.triton_attention import check_backend
from k2serve.model.triton_moe import check_moe_backend

logger = logging.getLogger(__name__)


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_output_tokens: int = 0
    first_scheduled_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        """Arrival to first scheduled (seconds); None while never scheduled."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float:
        return (self.first_token_time or self.arrival_time) - self.arrival_time

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first (seconds)."""
        if self.finish_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return 0.0
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens and, once finished, why it stopped."""

    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]
    prompt_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int
    text: str = ""
    new_text: str = ""
    logprobs: list[Any] = field(default_factory=list)
    metrics: RequestMetrics | None = None


def tokenizer_and_eos(model_dir: str | Path, config: ModelConfig) -> tuple[KimiTokenizer | None, list[int]]:
    """A checkpoint's tokenizer (None without tiktoken.model) and its EOS ids: the config's, merged
    with generation_config.json's."""
    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir) if (model_dir / "tiktoken.model").exists() else None
    eos = list(config.eos_token_ids)
    gen_cfg = model_dir / "generation_config.json"
    if gen_cfg.exists():
        g = json.loads(gen_cfg.read_text()).get("eos_token_id")
        if g is not None:
            eos = sorted(set(eos) | set(g if isinstance(g, list) else [g]))
    return tokenizer, eos


@dataclass
class SpecDecodeStats:
    """Speculative decoding totals since start (vLLM's spec_decode_* counters): rows that verified
    drafts, draft tokens verified, drafts accepted."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / verified draft tokens (0.0 before any)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_per_step(self) -> float:
        """Tokens a verifying row emits per step on average: accepted drafts + the one sampled token."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


def plain_greedy(seq: Sequence) -> bool:
    """Whether `seq`'s next tokens are each just the argmax of its logits: greedy, no penalties (they
    depend on the tokens before), no log-probabilities asked, no grammar, min_tokens reached (so no
    stop token is suppressed from here on)."""
    p = seq.params
    return (
        p.is_greedy
        and p.logprobs is None
        and p.presence_penalty == 0
        and p.frequency_penalty == 0
        and p.repetition_penalty == 1
        and seq.constraint is None
        and len(seq.output_token_ids) >= p.min_tokens
    )


class LLMEngine:
    def __init__(
        self,
        model: K2Model,
        config: EngineConfig | None = None,
        tokenizer: Any = None,
        eos_token_ids: list[int] | None = None,
    ) -> None:
        self.model = model
        self.config = config or EngineConfig()
        # the engine's tensors (pool, step inputs, sampler generators) live where the weights are
        self.device = model.embed_tokens.weight.device
        want = self.config.torch_device if self.config.device is not None else self.device
        if want.type != self.device.type or want.index not in (None, self.device.index):
            raise EngineConfigError(
                f"--device {self.config.device}: the model's weights are on {self.device}"
            )
        # before sizing and allocating the pool: the runner checks it again for its own callers
        check_backend(self.config.attention_backend, model.embed_tokens.weight.device)
        check_moe_backend(self.config.moe_backend, self.device)
        for layer in model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.experts.set_moe_backend(self.config.moe_backend)
        self.tokenizer = tokenizer
        mc = model.config
        self.eos_token_ids = list(eos_token_ids if eos_token_ids is not None else mc.eos_token_ids)
        self.kv_sizing = size_kv(model, self.config)
        self.max_model_len = self.kv_sizing.max_model_len
        num_blocks = self.kv_sizing.num_blocks
        dt, fp8 = pool_format(model, self.config)
        # The pool gets one block more than the block manager hands out: the scratch block where padding
        # rows of a step write their (unused) latent.
        self.pool = KVCachePool(
            mc.num_hidden_layers,
            num_blocks + 1,
            self.config.block_size,
            mc.kv_cache_dim,
            dt,
            self.device,
            fp8,
        )
        self.blocks = BlockManager(num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.tiers = attach_tiers(self.blocks, self.pool, self.config, model)  # None without any tier
        self.leases = EngineLeases.build(self.blocks, self.config)  # None without kv_session_lease_s
        spec = self.config.speculative_config
        self.proposer = None if spec is None else Proposer(spec)
        self.draft_budget = None if spec is None else DraftBudget(spec.num_speculative_tokens)
        self._proposed_at: dict[str, int] = {}  # a row's token count when it last asked the proposer
        self.scheduler = Scheduler(self.config, self.blocks, None if spec is None else self._propose)
        # Asynchronous tier reloads (None: reloads run inside the step, or no tiers).
        self.reloads = (
            AsyncReloads(self.blocks, self.tiers, self.config.kv_reload_timeout_s)
            if self.tiers is not None and self.config.kv_offload_async
            else None
        )
        self.scheduler.reloads = self.reloads
        pad_slot = num_blocks * self.config.block_size
        self.runner = ModelRunner(
            model,
            self.pool,
            pad_slot=pad_slot,
            attention_backend=self.config.attention_backend,
            captured=self._captured_decode(pad_slot),
        )
        self.sampler = Sampler()
        self.seqs: dict[str, Sequence] = {}
        self._decoders: dict[str, Any] = {}
        self.num_computed_tokens_total = 0  # tokens run through the model (prefix hits excluded)
        self.spec_stats = SpecDecodeStats()
        # Measured prefill speed for the router's predicted TTFT: an EWMA of prompt tokens per second of
        # the steps that computed prompt tokens (the whole step's time); 0.0 before the first such step.
        self.prefill_tokens_per_s = 0.0
        # Measured decode step for the router's predicted TPOT: EWMAs (weight 0.2 on the new one) of the
        # time (ms) and batch (sequences) of the steps that computed no prompt token; 0.0 before one.
        self.decode_step_ms = 0.0
        self.decode_step_batch = 0.0
        self._closed = False  # `close` ran

    def _captured_decode(self, pad_slot: int) -> CapturedDecode | None:
        """The captured decode step when EngineConfig.compile is "decode" and the model and pool allow
        it (else a warning naming why, and every step eager)."""
        if self.config.compile != "decode":
            return None
        reason = unsupported_reason(self.model, self.pool)
        if reason is not None:
            logger.warning("--compile decode: %s; decode steps run eager", reason)
            return None
        blocks = -(-self.max_model_len // self.config.block_size)
        spec = self.config.speculative_config
        rows = self.config.max_num_seqs * (1 + (spec.num_speculative_tokens if spec is not None else 0))
        return CapturedDecode(self.model, self.pool, pad_slot, rows, blocks)

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, dtype: torch.dtype = torch.float32, config: EngineConfig | None = None
    ) -> LLMEngine:
        config = config or EngineConfig()
        check_moe_backend(config.moe_backend, config.torch_device)  # before reading any weight
        layout = "ct" if config.moe_backend == "triton" else None  # the kernel reads the disk layout
        model = load_model(model_dir, dtype, device=config.torch_device, int4_layout=layout)
        tokenizer, eos = tokenizer_and_eos(model_dir, model.config)
        return cls(model, config, tokenizer, eos)

    # ---- requests ------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError (an InvalidRequestError naming the field, its value and the limit); does
        no work. The request checks are `validate_request`'s; top log-probabilities are bounded by the
        vocabulary here (the APIs bound them lower)."""
        vocab = self.model.config.vocab_size
        validate_request(
            prompt_token_ids, params, vocab_size=vocab, max_model_len=self.max_model_len, max_logprobs=vocab
        )
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError(
                "stop strings need a tokenizer; this model directory has none", "stop", params.stop
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        constraint: Any = None,
        kv_sink: KVSink | None = None,
        session_id: str | None = None,
    ) -> None:
        """Queue a request. `constraint` (a GrammarConstraint) restricts every sampled token; the
        request then also finishes ("stop") when the grammar terminates. `kv_sink(layer, kv)` receives
        every layer's latent of the whole prompt as soon as it is computed (disaggregated prefill).
        `session_id`: the agent session of this turn (with kv_session_lease_s its blocks are leased
        when it finishes, and this turn ends the session's previous lease)."""
        if request_id in self.seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise RequestError(f"queue is full ({self.config.max_waiting} waiting requests)")
        seq = Sequence(
            request_id,
            list(prompt_token_ids),
            params,
            generator=make_generator(params, self.device),
            constraint=constraint,
            kv_sink=kv_sink,
        )
        self.seqs[request_id] = seq
        self._attach_decoder(seq)
        self.scheduler.add(seq)
        if self.leases is not None:
            self.leases.added(request_id, session_id)

    def add_prefilled_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token_id: int,
        params: SamplingParams,
        block_table: list[int],
        constraint: Any = None,
        session_id: str | None = None,
    ) -> RequestOutput | None:
        """Continue a request whose prompt KV was computed elsewhere and written into `block_table`
        (blocks this engine's block manager allocated for it; the engine now owns them) and whose
        first token was sampled there. Returns the finished output when the first token already ends
        the request (the blocks are then freed), else None and the request joins the batch.
        `session_id`: as in `add_request` (its blocks are leased when it finishes)."""
        try:  # the engine owns `block_table` from here on, also when the request is refused
            if request_id in self.seqs:
                raise RequestError(f"request id {request_id!r} is already in use")
            self.validate(prompt_token_ids, params)
        except RequestError:
            self.blocks.free(block_table)
            raise
        seq = Sequence(
            request_id,
            list(prompt_token_ids),
            params,
            generator=make_generator(params, self.device),
            constraint=constraint,
        )
        skip_draw(params, seq.generator, self.model.config.vocab_size)  # the prefill side sampled it
        seq.block_table = list(block_table)
        seq.num_computed_tokens = len(prompt_token_ids)
        seq.output_token_ids.append(first_token_id)
        seq.first_token_time = time.monotonic()
        self.seqs[request_id] = seq
        if constraint is not None:
            constraint.accept(first_token_id)
        dec = self._attach_decoder(seq)
        if dec is not None:
            seq.output_text = dec.add(first_token_id)
        reason = self._stop_reason(seq, first_token_id)
        if self.leases is not None:
            self.leases.added(request_id, session_id)
        if reason is None:
            self.scheduler.add(seq)
            return None
        seq.finish_time = seq.first_token_time
        self.scheduler.finish(seq, reason)
        self.seqs.pop(request_id, None)
        self._finish_text(seq, reason)
        out = self._output(seq, [first_token_id], seq.output_text)
        if self.leases is not None:
            self.leases.after_step([out])
        return out

    def _attach_decoder(self, seq: Sequence) -> IncrementalDecoder | None:
        """Start detokenizing `seq`'s output incrementally (an IncrementalDecoder kept until the request
        ends, so multi-byte characters split across tokens come out whole); None without a tokenizer."""
        if self.tokenizer is None:
            return None
        dec = IncrementalDecoder(self.tokenizer, seq.params.skip_special_tokens)
        self._decoders[seq.request_id] = dec
        return dec

    def _finish_text(self, seq: Sequence, reason: str) -> str:
        """Drop `seq`'s decoder as the request ends for `reason`; returns the text it still held (a
        partial multi-byte character, as U+FFFD), also appended to `seq.output_text`. Nothing after a
        stop: the text ends at the stop token or before the stop string."""
        dec = self._decoders.pop(seq.request_id, None)
        if dec is None or reason == "stop":
            return ""
        tail = dec.finish()
        seq.output_text += tail
        return tail

    # ---- KV computed elsewhere ------------------------------------------------------------------
    @property
    def kv_geometry(self) -> KVGeometry:
        mc = self.model.config
        return KVGeometry(
            mc.num_hidden_layers,
            self.pool.row_width,
            self.blocks.block_size,
            self.pool.kv.dtype,
            self.pool.cache_dtype,
        )

    def reserve_kv(self, num_tokens: int) -> KVReservation:
        """Fresh blocks (never shared with the prefix cache) for `num_tokens` positions whose KV comes
        from elsewhere; raises NoFreeBlocksError, reserving nothing, when the pool is short. The
        caller hands the table back with `add_prefilled_request` or `free_kv`."""
        return KVReservation(self.pool, self.blocks.allocate_fresh(num_tokens), num_tokens)

    def free_kv(self, block_table: list[int]) -> None:
        """Return a reserved block table that no request adopted."""
        self.blocks.free(block_table)

    def abort_request(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        self._decoders.pop(request_id, None)
        if self.leases is not None:
            self.leases.dropped(request_id)
        if seq is not None and self.proposer is not None:
            self.proposer.finish(request_id, seq.output_token_ids)
            self._proposed_at.pop(request_id, None)
        if seq is None or seq.is_finished:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
        """Release what outlives a step: drain and close the KV tiers (the disk writes and shared-store
        puts still queued are done, their threads stopped; engine/kv_tiers.py `close_tiers`), waiting
        at most `timeout_s`. Call it once stepping is over (AsyncEngine.shutdown does); returns whether
        everything finished in time. Idempotent."""
        if self.tiers is None or self._closed:
            return True
        self._closed = True
        return close_tiers(self.tiers, timeout_s)

    # ---- the step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        if self.leases is not None:
            # a waiting head that already holds its blocks (a request prefilled elsewhere: the decode
            # worker's) needs no room for its tokens: only one without blocks may end leases early
            waiting = self.scheduler.waiting
            head = waiting[0] if waiting and not waiting[0].block_table else None
            self.leases.before_schedule(self.blocks, head.token_ids if head is not None else None)
        if self.tiers is not None:
            self.tiers.poll()  # blocks the background threads dropped: their "removed" events
        sched = self.scheduler.schedule()
        if not sched.chunks:
            if self.reloads is not None and self.reloads.in_flight:
                self.reloads.wait(0.05)  # nothing else to run: wait for a reload rather than spin
                return []
            if self.scheduler.waiting and not self.scheduler.running:
                seq = self.scheduler.waiting[0]
                raise RequestError(
                    f"request {seq.request_id!r} needs {self.blocks.blocks_needed(seq.num_tokens)} KV blocks; "
                    f"the pool has {self.blocks.num_blocks}"
                )
            return []
        rows = [
            RowSpec(
                c.seq.token_ids[c.start : c.start + c.num_tokens] + list(c.drafts),
                c.start,
                c.seq.block_table,
                c.samples,
                1 + len(c.drafts),
            )
            for c in sched.chunks
        ]
        t0 = time.perf_counter()
        logits = self.runner.run(
            rows, self._kv_sink_hook([c.seq for c in sched.chunks if c.samples])
        )  # [S, V]: 1 + len(drafts) rows per sampling chunk
        prompt_tokens = sum(c.num_tokens for c in sched.chunks if c.start < len(c.seq.prompt_token_ids))
        self._observe_prefill(prompt_tokens, time.perf_counter() - t0)
        if prompt_tokens == 0:
            self._observe_decode(len(sched.chunks), time.perf_counter() - t0)
        self.num_computed_tokens_total += sched.num_tokens
        for c in sched.chunks:
            c.seq.num_computed_tokens += c.num_tokens
            self.blocks.mark_computed(c.seq.block_table, c.seq.token_ids, c.seq.num_computed_tokens)
        plain: list[Sequence] = []
        plain_rows: list[int] = []
        speculative: list[tuple[ScheduledChunk, int]] = []
        at = 0
        for c in (c for c in sched.chunks if c.samples):
            if c.drafts:
                speculative.append((c, at))
            else:
                plain.append(c.seq)
                plain_rows.append(at)
            at += 1 + len(c.drafts)
        if not speculative:
            results = self._postprocess(plain, logits)
        else:
            results = self._postprocess(plain, logits[plain_rows])
            results.extend(self._verify(c, logits[row : row + 1 + len(c.drafts)]) for c, row in speculative)
        if self.draft_budget is not None and prompt_tokens == 0:
            self.draft_budget.observe_step(sched.num_tokens, time.perf_counter() - t0)
        if self.leases is not None:
            self.leases.after_step(results)
        return results

    def _observe_prefill(self, prompt_tokens: int, seconds: float) -> None:
        """Fold one step's prompt tokens per second into `prefill_tokens_per_s` (weight 0.2 on the new one)."""
        if prompt_tokens <= 0 or seconds <= 0:
            return
        rate = prompt_tokens / seconds
        old = self.prefill_tokens_per_s
        self.prefill_tokens_per_s = rate if old == 0.0 else 0.8 * old + 0.2 * rate

    def _observe_decode(self, batch: int, seconds: float) -> None:
        """Fold one decode-only step (its time and batch) into `decode_step_ms` / `decode_step_batch`."""
        if batch <= 0 or seconds <= 0:
            return
        if self.decode_step_ms == 0.0:
            self.decode_step_ms, self.decode_step_batch = seconds * 1e3, float(batch)
        else:
            self.decode_step_ms = 0.8 * self.decode_step_ms + 0.2 * seconds * 1e3
            self.decode_step_batch = 0.8 * self.decode_step_batch + 0.2 * batch

    def queued_prefill_tokens(self) -> int:
        """Prompt tokens still to compute: waiting sequences (a preempted one recomputes its output too)
        less the prefix the device pool holds for them now (`BlockManager.device_prefix_tokens`), and
        the rest of running sequences' prompts (chunked prefill). Without that discount a waiting turn
        of a conversation whose history this worker holds counted whole, so the router saw its holder
        as busy recomputing it and sent the next turn elsewhere (BENCHMARKS.md, route5); the router
        subtracts the uncached tokens of the prefills answered since a report."""
        sched, blocks = self.scheduler, self.blocks
        waiting = sum(
            max(
                0,
                s.num_uncomputed
                - blocks.device_prefix_tokens(
                    s.token_ids if s.output_token_ids else s.prompt_token_ids, s.prefix_chain
                ),
            )
            for s in sched.waiting
        )
        return waiting + sum(max(0, len(s.prompt_token_ids) - s.num_computed_tokens) for s in sched.running)

    def _kv_sink_hook(self, finishing: list[Sequence]) -> Callable[[int], None] | None:
        """A layer hook that hands each prompt-completing sequence with a kv_sink its whole latent."""
        sinks = [s for s in finishing if s.kv_sink is not None and not s.output_token_ids]
        if not sinks:
            return None
        slots = [self.pool.slot_mapping(s.block_table, 0, s.num_tokens) for s in sinks]

        def on_layer(layer: int) -> None:
            flat = self.pool.layer_rows(layer)  # [slots, row_width]: raw rows (fp8 rows as stored)
            for seq, sl in zip(sinks, slots, strict=True):
                if seq.kv_sink is None:
                    continue
                try:
                    seq.kv_sink(layer, flat.index_select(0, sl))  # a copy: [num_tokens, D]
                except Exception:  # the sink's request alone loses its KV; the step and the batch go on
                    logger.exception(
                        "kv_sink of %s failed at layer %d; no more layers go to it", seq.request_id, layer
                    )
                    seq.kv_sink = None

        return on_layer

    def _postprocess(self, seqs: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        if not seqs:
            return []
        logits, allowed = self._restrict(seqs, logits)
        out = self.sampler.sample(
            logits,
            [s.params for s in seqs],
            [s.output_token_ids for s in seqs],
            [s.generator for s in seqs],
            allowed,
        )
        now = time.monotonic()
        results = []
        for i, seq in enumerate(seqs):
            tok = int(out.token_ids[i])
            new_text = self._emit(seq, tok, None if out.logprobs is None else out.logprobs[i], now)
            results.append(self._output(seq, [tok], new_text))
        return results

    def _restrict(
        self, seqs: list[Sequence], logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows' logits with EOS / stop tokens suppressed before min_tokens, and the grammar
        constraints' allowed mask (None when no row has one)."""
        early = [i for i, s in enumerate(seqs) if len(s.output_token_ids) < s.params.min_tokens]
        for i in early:
            banned = ([] if seqs[i].params.ignore_eos else self.eos_token_ids) + seqs[i].params.stop_token_ids
            logits = suppress_tokens(logits, [i], banned)
        allowed = None
        if any(s.constraint is not None for s in seqs):
            allowed = torch.ones_like(logits, dtype=torch.bool)
            for i, s in enumerate(seqs):
                if s.constraint is not None:
                    allowed[i] = s.constraint.allowed_mask(logits.shape[1])
        return logits, allowed

    def _emit(self, seq: Sequence, tok: int, logprobs: Any, now: float) -> str:
        """Append one sampled token to `seq` (grammar, log-probabilities, text, stop checks; finishes
        the request on a stop or the length limit); returns the new text."""
        seq.output_token_ids.append(tok)
        if seq.constraint is not None:
            seq.constraint.accept(tok)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        if seq.first_token_time is None:
            seq.first_token_time = now
        new_text = ""
        dec = self._decoders.get(seq.request_id)
        if dec is not None:
            new_text = dec.add(tok)
            seq.output_text += new_text
        reason = self._stop_reason(seq, tok)
        if reason is not None:
            seq.finish_time = now
            self.scheduler.finish(seq, reason)
            if self.proposer is not None:
                self.proposer.finish(seq.request_id, seq.output_token_ids)
                self._proposed_at.pop(seq.request_id, None)
            self.seqs.pop(seq.request_id, None)
            new_text += self._finish_text(seq, reason)
        return new_text

    # ---- speculative decoding ------------------------------------------------------------------
    def _propose(self, seq: Sequence, limit: int) -> list[int]:
        """Drafts for `seq` (the scheduler's proposer): none for grammar-constrained requests; never
        past max_model_len, nor more than max_tokens leaves room for (the step adds one token more), nor
        more than `DraftBudget` finds worth their verifying rows' time (none: the proposer is not asked)."""
        if self.proposer is None or seq.constraint is not None:
            return []
        room = min(self.max_model_len - seq.num_tokens, seq.params.max_tokens - len(seq.output_token_ids)) - 1
        limit = min(limit, room)
        if limit < 1:
            return []
        if self.draft_budget is None:
            return self.proposer.propose(seq.request_id, seq.prompt_token_ids, seq.output_token_ids, limit)
        limit = self.draft_budget.budget(len(self.scheduler.running), limit)
        if limit < 1:  # asked first: no proposing (suffix trees, n-gram search) for no drafts
            return []
        t0 = time.perf_counter()
        drafts = self.proposer.propose(seq.request_id, seq.prompt_token_ids, seq.output_token_ids, limit)
        # the proposer caught up on every token since this row last asked (all of them the first time)
        tokens = seq.num_tokens - self._proposed_at.get(seq.request_id, 0)
        self._proposed_at[seq.request_id] = seq.num_tokens
        self.draft_budget.observe_propose(time.perf_counter() - t0, tokens)
        return drafts

    def _verify(self, chunk: ScheduledChunk, logits: torch.Tensor) -> RequestOutput:
        """Verify a speculative row: logits [1 + d, V] at its last token and its d drafts. Drafts are
        accepted while the sampler agrees (`Sampler.verify_draft`); the first rejection's token, or the
        bonus token after all d, ends the run. Every token goes through the stop checks; tokens after
        a stop are dropped. The accepted drafts' KV stays; the slots past them are rolled back (a
        block holding only drafts is freed; the rest are overwritten later; none is ever hashed)."""
        seq, drafts = chunk.seq, chunk.drafts
        now = time.monotonic()
        new: list[int] = []
        new_text = ""
        accepted = 0
        # plain greedy rows: every position's token is its logits' argmax whatever the tokens before
        # it, so one argmax over the 1 + d rows does (the per-position sampler calls cost ~30 us each)
        argmax = logits.argmax(dim=-1).tolist() if plain_greedy(seq) else None
        for j in range(len(drafts) + 1):
            if argmax is not None:
                tok, ok, logprobs = argmax[j], j < len(drafts) and argmax[j] == drafts[j], None
            else:
                row, _ = self._restrict([seq], logits[j : j + 1].clone())
                if j < len(drafts):
                    out, ok = self.sampler.verify_draft(
                        row, seq.params, seq.output_token_ids, seq.generator, drafts[j]
                    )
                else:
                    out, ok = (
                        self.sampler.sample(row, [seq.params], [seq.output_token_ids], [seq.generator]),
                        False,
                    )
                tok, logprobs = int(out.token_ids[0]), None if out.logprobs is None else out.logprobs[0]
            new.append(tok)
            new_text += self._emit(seq, tok, logprobs, now)
            if not ok:
                break
            accepted += 1
            if seq.is_finished:
                break
        self.spec_stats.num_drafts += 1
        self.spec_stats.num_draft_tokens += len(drafts)
        self.spec_stats.num_accepted_tokens += accepted
        if self.proposer is not None:
            self.proposer.record(seq.request_id, accepted)
        if self.draft_budget is not None and not seq.is_finished:
            self.draft_budget.observe_verify(len(drafts), accepted)  # (a stop ends drafts, not a rejection)
        if not seq.is_finished:
            seq.num_computed_tokens += accepted  # the accepted drafts' KV is the real tokens'
            self.blocks.mark_computed(seq.block_table, seq.token_ids, seq.num_computed_tokens)
            keep = self.blocks.blocks_needed(seq.num_tokens)
            if len(seq.block_table) > keep:
                self.blocks.free(seq.block_table[keep:])
                del seq.block_table[keep:]
        return self._output(seq, new, new_text)

    def _stop_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        n_out = len(seq.output_token_ids)
        if seq.constraint is not None and seq.constraint.is_terminated():
            return "stop"
        if n_out >= p.min_tokens:
            if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
                return "stop"
            if p.stop and self._hit_stop_string(seq):
                return "stop"
        if n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _hit_stop_string(self, seq: Sequence) -> bool:
        """Search the new text for a stop string; on a hit, cut the text before it (vLLM's default)."""
        longest = max(len(s) for s in seq.params.stop)
        begin = max(0, seq.stop_checked_chars - longest + 1)
        hits = [i for i in (seq.output_text.find(s, begin) for s in seq.params.stop) if i >= 0]
        seq.stop_checked_chars = len(seq.output_text)
        if not hits:
            return False
        seq.output_text = seq.output_text[: min(hits)]
        return True

    def _output(self, seq: Sequence, new: list[int], new_text: str) -> RequestOutput:
        metrics = RequestMetrics(
            seq.arrival_time,
            seq.first_token_time,
            seq.finish_time,
            len(seq.output_token_ids),
            seq.first_scheduled_time,
        )
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new,
            token_ids=list(seq.output_token_ids),
            prompt_token_ids=seq.prompt_token_ids,
            finished=seq.status is SequenceStatus.FINISHED,
            finish_reason=seq.finish_reason,
            num_cached_tokens=seq.num_cached_tokens,
            text=seq.output_text,
            new_text=new_text,
            logprobs=list(seq.logprobs),
            metrics=metrics,
        )
