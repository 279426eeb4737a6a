"""Offline API: `LLM(model_dir).generate(prompts, params)`, with vLLM's names so users can switch."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from k2serve.engine.config import EngineConfig, SpeculativeConfig
from k2serve.engine.llm_engine import LLMEngine, RequestMetrics
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.sequence import RequestError


@dataclass
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_cached_tokens: int
    logprobs: list[Any]
    metrics: RequestMetrics


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "auto": "bfloat16"}
    name = aliases.get(dtype, dtype)
    if name not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"dtype must be bfloat16, float32 or float16, got {dtype!r}")
    return getattr(torch, name)


class LLM:
    def __init__(
        self,
        model: str | Path,
        dtype: str | torch.dtype = "float32",
        engine_config: EngineConfig | None = None,
        speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None,
        device: str | None = None,
    ) -> None:
        """`speculative_config`: vLLM's, e.g. {"method": "ngram", "num_speculative_tokens": 4,
        "prompt_lookup_max": 4, "prompt_lookup_min": 1} (EngineConfig.speculative_config; this one
        wins when both are given). `device` ("cpu", "cuda", "cuda:N"): overrides `engine_config.device`
        when given."""
        engine_config = engine_config or EngineConfig()
        if speculative_config is not None:
            spec = SpeculativeConfig.parse(speculative_config)
            engine_config = dataclasses.replace(engine_config, speculative_config=spec)
        if device is not None:
            engine_config = dataclasses.replace(engine_config, device=device)
        self.engine = LLMEngine.from_pretrained(model, _dtype(dtype), engine_config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(
                    "text prompts need a tokenizer; this model directory has none (pass token ids)"
                )
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        """Generate for every prompt (text or token ids) in one continuous batch; results in prompt order.

        Every prompt is validated before any work starts; an invalid one raises RequestError.
        """
        batch: list[str | Sequence[int]]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            batch = [prompts]  # type: ignore[list-item]  # one prompt: text, or token ids
        else:
            batch = list(prompts)  # type: ignore[arg-type]  # a list of prompts
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, Sequence) else [params] * len(batch)
        if len(plist) != len(batch):
            raise RequestError(f"{len(plist)} sampling params for {len(batch)} prompts")
        encoded = [self._encode(p) for p in batch]
        for ids, p in zip(encoded, plist, strict=True):
            self.engine.validate(ids, p)
        order = []
        for ids, p in zip(encoded, plist, strict=True):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, ids, p)
            order.append(rid)
        done: dict[str, CompletionOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    assert out.metrics is not None
                    done[out.request_id] = CompletionOutput(
                        out.request_id,
                        out.prompt_token_ids,
                        out.token_ids,
                        out.text,
                        out.finish_reason,
                        out.num_cached_tokens,
                        out.logprobs,
                        out.metrics,
                    )
        return [done[r] for r in order]
