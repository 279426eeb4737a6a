"""One request's state inside the engine."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from k2serve.engine.sampling_params import SamplingParams

KVSink = Callable[[int, torch.Tensor], None]
"""Disaggregated prefill: called as kv_sink(layer, kv [num_tokens, kv_dim]) with the whole prompt's
latent of each layer during the step that completes the prompt (the prefill worker sends it on)."""


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class RequestError(ValueError):
    """A request the engine refuses before doing any work; the message names the value and the limit."""


@dataclass
class Sequence:
    """Token ids are prompt + generated. `num_computed_tokens` counts positions whose latent is cached.

    After preemption (recompute) the sequence goes back to WAITING with its generated tokens kept and
    `num_computed_tokens` reset: its next prefill covers prompt + generated tokens, then it samples on.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # first admission into the running batch (a metric)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt positions served by the prefix cache (first allocation)
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    logprobs: list = field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    output_text: str = ""
    constraint: Any = None  # a chat.structured.GrammarConstraint: allowed_mask / accept / is_terminated
    kv_sink: KVSink | None = None
    stop_checked_chars: int = 0  # output text already searched for stop strings
    # chain hashes of the leading blocks of token_ids, computed as far as needed (a memo for the
    # queued-prefill count: BlockManager.device_prefix_tokens); token_ids only grow, so it stays valid
    prefix_chain: list[int] = field(default_factory=list, repr=False, compare=False)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
