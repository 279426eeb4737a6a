"""AsyncEngine: tokens equal the synchronous engine's, abort frees blocks, admission control, drain, and
failures that stay with the request that caused them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from k2serve.chat.tokenizer import load_tokenizer
from k2serve.engine.async_engine import AsyncEngine
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.protocol import (
    BackendFailure,
    DrainingError,
    GenerateRequest,
    GenerationBackend,
    InvalidRequestError,
    QueueFullError,
    TokenEvent,
)
from k2serve.engine.sampling_params import SamplingParams
from k2serve.model.loader import load_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def parts(tiny_ckpt: Path) -> Iterator[tuple[Any, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine thread shares 2 cores with the test
    try:
        yield load_model(tiny_ckpt, torch.float32), load_tokenizer(tiny_ckpt)
    finally:
        torch.set_num_threads(threads)


def make_engine(parts: tuple[Any, Any], **kw: Any) -> LLMEngine:
    model, tok = parts
    cfg = EngineConfig(**({"num_kv_blocks": 512, "block_size": 8, "max_model_len": 512} | kw))
    return LLMEngine(model, cfg, tok)


@pytest.fixture
def backend(parts: tuple[Any, Any]) -> Iterator[AsyncEngine]:
    be = AsyncEngine(make_engine(parts), "tiny")
    be.start()
    try:
        yield be
    finally:
        be.shutdown()


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


async def run(be: AsyncEngine, rid: str, ids: list[int], params: SamplingParams) -> list[TokenEvent]:
    stream = await be.generate(GenerateRequest(rid, ids, params))
    return [ev async for ev in stream]


async def wait_idle(be: AsyncEngine, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.01)):
        s = be.stats()
        if be.num_in_flight == 0 and s.num_running == 0 and s.num_waiting == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend not idle: {be.stats()}")


def assert_all_blocks_free(be: AsyncEngine) -> None:
    blocks = be.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks
    blocks.check_invariants([])


def test_is_a_generation_backend(parts: tuple[Any, Any], backend: AsyncEngine) -> None:
    assert isinstance(backend, GenerationBackend)
    assert backend.vocab_size == 1280 and backend.max_model_len == 512 and backend.model_name == "tiny"
    small_pool = AsyncEngine(make_engine(parts, num_kv_blocks=20, max_model_len=None), "tiny")
    assert small_pool.max_model_len == 160  # 20 blocks of 8 positions
    with pytest.raises(InvalidRequestError) as info:
        small_pool._validate(GenerateRequest("r", list(range(100)), greedy(61)))
    assert (info.value.param, info.value.limit) == ("max_tokens", 160)


def test_concurrent_requests_match_the_synchronous_engine(
    parts: tuple[Any, Any], backend: AsyncEngine
) -> None:
    prompts = [[(7 * i + j) % 1000 for j in range(5 + 9 * i)] for i in range(6)]
    params = [greedy(6 + 3 * i, logprobs=2 if i % 2 else None) for i in range(6)]
    ref = make_engine(parts)
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        ref.add_request(str(i), p, sp)
    expected: dict[str, list[int]] = {}
    while ref.has_unfinished_requests():
        expected |= {o.request_id: o.token_ids for o in ref.step() if o.finished}

    async def main() -> list[list[TokenEvent]]:
        return await asyncio.gather(
            *(run(backend, str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True)))
        )

    results = asyncio.run(main())
    for i, evs in enumerate(results):
        assert [t for ev in evs for t in ev.token_ids] == expected[str(i)]
        assert [ev.finish_reason for ev in evs][-1] == "length"
        assert all(ev.finish_reason is None for ev in evs[:-1])
        assert {ev.num_prompt_tokens for ev in evs} == {len(prompts[i])}
        lps = [lp for ev in evs for lp in (ev.logprobs or [])]
        if params[i].logprobs:
            assert [lp.token_id for lp in lps] == expected[str(i)] and all(len(lp.top) == 2 for lp in lps)
        else:
            assert not lps
    asyncio.run(wait_idle(backend))
    assert_all_blocks_free(backend)
    assert backend.stats().kv_blocks_used == 0


def test_abort_and_abandoned_streams_free_their_blocks(backend: AsyncEngine) -> None:
    async def main() -> None:
        stream = await backend.generate(GenerateRequest("a", list(range(40)), greedy(400)))
        first = await anext(aiter(stream))
        assert first.token_ids and first.finish_reason is None
        await backend.abort("a")
        rest = [ev async for ev in stream]
        assert rest[-1].finish_reason in ("abort", "length")
        await backend.abort("a")  # idempotent
        await backend.abort("never-seen")
        await wait_idle(backend)

    asyncio.run(main())
    assert_all_blocks_free(backend)


def test_bad_requests_fail_only_their_caller(backend: AsyncEngine) -> None:
    bad: list[tuple[GenerateRequest, str]] = [
        (GenerateRequest("b1", [5, 99999], greedy(4)), "prompt_token_ids"),
        (GenerateRequest("b2", [], greedy(4)), "prompt_token_ids"),
        (GenerateRequest("b3", list(range(500)), greedy(40)), "max_tokens"),
        (GenerateRequest("b4", list(range(512)), greedy(1)), "prompt_token_ids"),
        (GenerateRequest("b5", [1, 2], greedy(4, logprobs=50)), "logprobs"),
        (GenerateRequest("b6", [1, 2], greedy(4, top_k=5000)), "top_k"),
        (GenerateRequest("b7", [1, 2], greedy(4, stop_token_ids=[4000])), "stop_token_ids"),
        (GenerateRequest("b8", [1, 2], greedy(4), {"response_format": {"type": "xml"}}), "response_format"),
        (GenerateRequest("b9", [1, 2], greedy(4), {"tools": [], "tool_choice": "required"}), "tool_choice"),
    ]

    async def main() -> None:
        good = asyncio.ensure_future(run(backend, "good", list(range(30)), greedy(30)))
        for req, param in bad:
            with pytest.raises(InvalidRequestError) as info:
                await backend.generate(req)
            assert info.value.param == param, (req, info.value)
        ctx = await backend.generate(GenerateRequest("dup", [1, 2], greedy(300)))
        with pytest.raises(InvalidRequestError) as info:
            await backend.generate(GenerateRequest("dup", [1, 2], greedy(3)))
        assert info.value.param == "request_id"
        await backend.abort("dup")
        assert [ev async for ev in ctx][-1].finish_reason in ("abort", "length")
        evs = await good
        assert sum(len(ev.token_ids) for ev in evs) == 30 and evs[-1].finish_reason == "length"
        limit = (await backend.generate(GenerateRequest("lim", list(range(500)), greedy(12)))).__aiter__()
        assert [ev async for ev in limit][-1].finish_reason == "length"

    asyncio.run(main())


def test_structured_request_is_compiled_by_the_backend(backend: AsyncEngine) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"enum": ["x", "yy"]}},
        "required": ["a"],
        "additionalProperties": False,
    }
    spec = {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}
    stream_evs = asyncio.run(_structured_run(backend, spec))
    ids = [t for ev in stream_evs for t in ev.token_ids]
    assert stream_evs[-1].finish_reason == "stop"
    assert ids[-1] == backend.tokenizer.eos_id
    assert backend.tokenizer.decode(ids[:-1]) in ('{"a": "x"}', '{"a": "yy"}')


async def _structured_run(be: AsyncEngine, spec: dict[str, Any]) -> list[TokenEvent]:
    stream = await be.generate(
        GenerateRequest("s", [3, 4, 5], SamplingParams(temperature=0.0, max_tokens=60), spec)
    )
    return [ev async for ev in stream]


def test_queue_full_then_drain_finishes_in_flight(parts: tuple[Any, Any]) -> None:
    be = AsyncEngine(make_engine(parts, max_num_seqs=1, max_waiting=1), "tiny")
    be.start()

    async def main() -> None:
        a = await be.generate(GenerateRequest("a", [1, 2, 3], greedy(40)))
        it_a: AsyncIterator[TokenEvent] = aiter(a)
        await anext(it_a)  # a is running
        b = await be.generate(GenerateRequest("b", [4, 5, 6], greedy(5)))
        with pytest.raises(QueueFullError) as info:
            await be.generate(GenerateRequest("c", [7], greedy(5)))
        assert (info.value.num_waiting, info.value.limit) == (1, 1)
        assert be.stats().num_waiting == 1 and be.stats().num_running == 1
        drained = asyncio.ensure_future(be.drain(timeout=60))
        await asyncio.sleep(0)
        with pytest.raises(DrainingError):
            be.check_admission()
        with pytest.raises(DrainingError):
            await be.generate(GenerateRequest("d", [7], greedy(5)))
        rest_a = [ev async for ev in it_a]
        evs_b = [ev async for ev in b]
        await drained
        assert rest_a[-1].finish_reason == "length" and evs_b[-1].finish_reason == "length"
        assert sum(len(ev.token_ids) for ev in evs_b) == 5

    try:
        asyncio.run(main())
    finally:
        be.shutdown()
    assert be._thread is not None and not be._thread.is_alive()
    assert_all_blocks_free(be)


def test_shutdown_ends_in_flight_requests_with_abort(parts: tuple[Any, Any]) -> None:
    be = AsyncEngine(make_engine(parts), "tiny")
    be.start()

    async def main() -> None:
        stream = await be.generate(GenerateRequest("x", [1, 2, 3], greedy(400)))
        it = aiter(stream)
        await anext(it)
        await asyncio.to_thread(be.shutdown)
        assert [ev async for ev in it][-1].finish_reason in ("abort", "length")
        with pytest.raises(DrainingError):
            await be.generate(GenerateRequest("y", [1], greedy(2)))

    asyncio.run(main())
    assert_all_blocks_free(be)


def test_a_failing_step_ends_only_in_flight_requests(
    backend: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = backend.engine.runner
    real_run = runner.run
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected kernel failure")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(runner, "run", flaky)

    async def main() -> None:
        with pytest.raises(BackendFailure) as info:
            await run(backend, "victim", [1, 2, 3], greedy(20))
        assert info.value.request_id == "victim"
        await wait_idle(backend)
        evs = await run(backend, "after", [1, 2, 3], greedy(5))
        assert evs[-1].finish_reason == "length"

    asyncio.run(main())
    assert_all_blocks_free(backend)


def test_stats_report_prefix_hits(backend: AsyncEngine) -> None:
    prompt = list(range(100, 180))

    async def main() -> tuple[list[TokenEvent], list[TokenEvent]]:
        first = await run(backend, "p1", prompt, greedy(3))
        return first, await run(backend, "p2", prompt, greedy(3))

    first, second = asyncio.run(main())
    assert first[0].num_cached_tokens == 0 and second[0].num_cached_tokens >= 72
    s = backend.stats()
    assert s.kv_blocks_total == 512 and 0.0 < s.prefix_hit_rate <= 1.0 and s.num_preemptions == 0
