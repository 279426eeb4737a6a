"""The AsyncEngine's vLLM-named metrics: token counters equal what was computed and generated, one
finish per request by reason (aborts included), histograms observed once per request, gauges read
from the scheduler, and no per-request state left behind."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from k2serve.chat.tokenizer import load_tokenizer
from k2serve.engine.async_engine import AsyncEngine, Prefilled
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.protocol import GenerateRequest
from k2serve.engine.sampling_params import SamplingParams
from k2serve.model.loader import load_model

pytestmark = pytest.mark.timeout(120)


def samples(be: AsyncEngine) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the engine's registry as exposed (parsed back from the text format)."""
    out = {}
    for fam in text_string_to_metric_families(generate_latest(be.metrics.registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(be: AsyncEngine, name: str, **labels: str) -> float:
    want = {"model_name": "tiny", "engine": "e0", "role": "serve"} | labels
    return samples(be)[(name, tuple(sorted(want.items())))]


@pytest.fixture(scope="module")
def parts(tiny_ckpt: Path) -> Iterator[tuple[Any, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_model(tiny_ckpt, torch.float32), load_tokenizer(tiny_ckpt)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def backend(parts: tuple[Any, Any]) -> Iterator[AsyncEngine]:
    model, tok = parts
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=256, block_size=8, max_model_len=256), tok)
    be = AsyncEngine(engine, "tiny", engine_id="e0")
    be.start()
    try:
        yield be
    finally:
        be.shutdown()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


async def drain(be: AsyncEngine, req: GenerateRequest, **kw: Any) -> int:
    return sum([len(ev.token_ids) async for ev in await be.generate(req, **kw)])


def test_counters_and_histograms_match_the_requests(backend: AsyncEngine) -> None:
    prompts = [list(range(10, 10 + n)) for n in (5, 17, 9)]
    lengths = [4, 7, 1]

    async def main() -> int:
        got = await asyncio.gather(
            *(
                drain(backend, GenerateRequest(f"r{i}", p, greedy(n)))
                for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
            )
        )
        return sum(got)

    generated = asyncio.run(main())
    assert generated == sum(lengths)
    assert value(backend, "vllm:prompt_tokens_total") == sum(map(len, prompts))
    assert value(backend, "vllm:generation_tokens_total") == sum(lengths)
    assert value(backend, "vllm:request_success_total", finished_reason="length") == 3
    assert value(backend, "vllm:request_success_total", finished_reason="abort") == 0
    assert value(backend, "vllm:time_to_first_token_seconds_count") == 3
    assert value(backend, "vllm:inter_token_latency_seconds_count") == sum(lengths) - 3
    assert value(backend, "vllm:e2e_request_latency_seconds_count") == 3
    assert value(backend, "vllm:request_queue_time_seconds_count") == 3
    assert value(backend, "vllm:e2e_request_latency_seconds_sum") > 0
    assert value(backend, "vllm:prefix_cache_queries_total") == backend.stats().prefix_query_tokens > 0
    assert value(backend, "vllm:num_requests_running") == 0
    assert value(backend, "vllm:kv_cache_usage_perc") == 0.0
    assert backend.num_in_flight == 0


def test_abort_is_counted_once_and_forgotten(backend: AsyncEngine) -> None:
    async def main() -> None:
        stream = await backend.generate(GenerateRequest("long", list(range(3, 40)), greedy(200)))
        first = await anext(stream)
        assert first.token_ids
        assert value(backend, "vllm:num_requests_running") == 1
        assert 0 < value(backend, "vllm:kv_cache_usage_perc") < 1
        await backend.abort("long")
        rest = [ev async for ev in stream]
        assert rest[-1].finish_reason == "abort"

    asyncio.run(main())
    assert value(backend, "vllm:request_success_total", finished_reason="abort") == 1
    assert value(backend, "vllm:request_success_total", finished_reason="length") == 0
    assert value(backend, "vllm:e2e_request_latency_seconds_count") == 1
    assert backend.num_in_flight == 0


def test_prefilled_request_counts_no_prompt_and_no_ttft(backend: AsyncEngine) -> None:
    """A decode-side request: its prompt and first token came from elsewhere."""
    prompt = list(range(20, 36))

    async def main() -> int:
        reservation = await backend.reserve_kv(len(prompt))
        req = GenerateRequest("pd", prompt, greedy(5))
        return await drain(backend, req, prefilled=Prefilled(7, reservation.block_table))

    assert asyncio.run(main()) == 4  # the first of the 5 was sampled by the prefill side
    assert value(backend, "vllm:prompt_tokens_total") == 0
    assert value(backend, "vllm:generation_tokens_total") == 4
    assert value(backend, "vllm:time_to_first_token_seconds_count") == 0
    assert value(backend, "vllm:inter_token_latency_seconds_count") == 4
    assert value(backend, "vllm:request_success_total", finished_reason="length") == 1


def test_role_must_be_known(parts: tuple[Any, Any]) -> None:
    model, tok = parts
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=16, block_size=8, max_model_len=64), tok)
    with pytest.raises(ValueError, match="role"):
        AsyncEngine(engine, "tiny", role="router")
