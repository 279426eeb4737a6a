"""Continuous batching: which sequences compute how many tokens this step.

Each step: running sequences first (decodes and unfinished prefill chunks, oldest first), then
waiting ones are admitted while the token budget, the sequence limit and the block pool allow.
Prompts longer than the remaining budget are prefilled in chunks over several steps, mixed with
decodes. Running sequences come first, so a long prompt's chunk takes only what the running decodes
leave of the budget and never stalls them (tests/test_long_scheduling.py). When the pool runs dry the
most recently admitted running sequence is preempted by recompute: its blocks are freed and it waits
again, keeping the tokens it generated.

With a `proposer` (speculative decoding), a decoding sequence may also verify draft tokens: its row
is its last token + d drafts at positions start..start + d. The drafts count against the token
budget and get KV slots like any token; when the pool is short, fewer drafts are proposed (never a
preemption for drafts). The engine rolls back the slots of rejected drafts after the step.

With `reloads` (asynchronous KV tier reloads, engine/kv_tiers.py:AsyncReloads), a waiting sequence
whose cached prefix is partly in a host / disk tier starts its reload when admission reaches it and
stays waiting (skipped, in place) until the reload is done; the sequences behind it are admitted
meanwhile, and running ones keep running.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from k2serve.engine.config import EngineConfig
from k2serve.engine.sequence import Sequence, SequenceStatus
from k2serve.kvcache.block_manager import Allocation, BlockManager


@dataclass(frozen=True)
class ScheduledChunk:
    """`seq` computes positions [start, start + num_tokens) this step."""

    seq: Sequence
    start: int
    num_tokens: int
    drafts: tuple[int, ...] = ()  # draft tokens verified after the chunk (positions start + num_tokens..)

    @property
    def samples(self) -> bool:
        """Whether the chunk reaches the sequence's last token, so a new token is sampled after it."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens + len(c.drafts) for c in self.chunks)


Proposer = Callable[[Sequence, int], list[int]]
"""proposer(seq, limit): at most `limit` draft tokens to verify after `seq`'s last token."""


class Reloads(Protocol):
    """Asynchronous tier reloads as the scheduler sees them (engine/kv_tiers.py:AsyncReloads)."""

    def admit(self, seq: Sequence) -> Allocation | bool:
        """`seq`'s allocation when its reload is done; True while it is in flight (started now or
        before: skip it); False when it needs none (allocate as usual)."""
        ...

    def cancel(self, seq: Sequence) -> None:
        """`seq` leaves before its reload was admitted: give its blocks back."""
        ...


class Scheduler:
    def __init__(
        self, config: EngineConfig, block_manager: BlockManager, proposer: Proposer | None = None
    ) -> None:
        self.config = config
        self.blocks = block_manager
        self.proposer = proposer
        self.reloads: Reloads | None = None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # total since start (a metric)

    def add(self, seq: Sequence) -> None:
        """Queue `seq`. It may come with `block_table` and `num_computed_tokens` already set (its KV
        was computed elsewhere and written into those blocks): it is then admitted without allocation."""
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished and return its blocks to the pool (cached prefixes stay reusable)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.block_table:
            self.blocks.free(seq.block_table)
            seq.block_table = []
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            if self.reloads is not None:
                self.reloads.cancel(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _drafts(self, seq: Sequence, limit: int) -> list[int]:
        """Drafts for a decoding sequence (one uncomputed token, some output already), at most `limit`."""
        if self.proposer is None or limit < 1 or not seq.output_token_ids:
            return []
        return self.proposer(seq, limit)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        # 1. Running sequences, oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            drafts = self._drafts(seq, budget - 1) if n == seq.num_uncomputed == 1 else []
            while drafts and not self.blocks.can_append(
                seq.block_table, seq.num_computed_tokens + 1 + len(drafts)
            ):
                drafts.pop()  # fewer drafts rather than a preemption
            while not self.blocks.can_append(seq.block_table, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq itself was the newest and got preempted; nothing newer remains
            self.blocks.append_slot(seq.block_table, seq.num_computed_tokens + n + len(drafts))
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n, tuple(drafts)))
            budget -= n + len(drafts)
            i += 1

        # 2. Admit waiting sequences (not in a step that had to preempt: the pool is full), in order;
        #    one whose tier reload is in flight is skipped and stays in place.
        j = 0
        while (
            j < len(self.waiting)
            and not out.preempted
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[j]
            if not seq.block_table:  # a sequence prefilled elsewhere arrives with its blocks filled
                tokens = seq.token_ids
                reload = self.reloads.admit(seq) if self.reloads is not None else False
                if reload is True:
                    j += 1
                    continue
                if isinstance(reload, Allocation):
                    alloc = reload
                elif not self.blocks.can_allocate(tokens):
                    break
                else:
                    alloc = self.blocks.allocate(tokens)
                seq.block_table = alloc.block_table
                seq.num_computed_tokens = alloc.num_cached_tokens
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = alloc.num_cached_tokens
            elif not self.blocks.can_append(seq.block_table, seq.num_tokens):
                break
            else:
                self.blocks.append_slot(seq.block_table, seq.num_tokens)
            del self.waiting[j]
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
        return out
