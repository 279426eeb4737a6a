"""A Reserve RPC cancelled by its deadline (the router gave up, the link was cut) leaks no KV blocks and
leaves the decode worker's engine thread serving: it used to settle the cancelled future and die of
InvalidStateError, so the worker took no request until it was restarted (the multihost flake)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from conftest import grpc_server_in_thread

from k2serve.decode.worker import DecodeServicer
from k2serve.engine.async_engine import AsyncEngine
from k2serve.engine.config import EngineConfig
from k2serve.engine.kv_reservation import KVReservation
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.protocol import GenerateRequest
from k2serve.engine.sampling_params import SamplingParams
from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.transfer.registry import make_receiver

pytestmark = pytest.mark.timeout(120)
SLOW_S = 1.0  # how long the engine thread is kept busy; the RPC deadline is far shorter


@pytest.fixture
def engine(tiny_ckpt: Path) -> Iterator[AsyncEngine]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = EngineConfig(num_kv_blocks=64, block_size=8, max_model_len=256)
    be = AsyncEngine(LLMEngine.from_pretrained(tiny_ckpt, torch.float32, cfg), "tiny")
    be.start()
    try:
        yield be
    finally:
        be.shutdown()
        torch.set_num_threads(threads)


def free_blocks(engine: AsyncEngine) -> int:
    return asyncio.run(engine.call(lambda e: e.blocks.num_free_blocks))


def served(engine: AsyncEngine) -> list[int]:
    async def run() -> list[int]:
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        events = await engine.generate(GenerateRequest("after", [1, 2, 3, 4, 5], params))
        return [t async for ev in events for t in ev.token_ids]

    return asyncio.run(asyncio.wait_for(run(), 30))


@pytest.mark.parametrize("busy", ["queued", "reserving"])
def test_a_cancelled_reservation_leaks_nothing_and_the_engine_lives_on(
    engine: AsyncEngine, busy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """queued: the engine thread is busy when Reserve's deadline passes, so the reservation is cancelled
    before it runs (it must never run); reserving: the deadline passes while the engine thread reserves
    (the blocks it took must go back)."""
    before = free_blocks(engine)
    receiver = make_receiver("grpc", "127.0.0.1:0")
    servicer = DecodeServicer(engine, receiver, "grpc")
    llm = engine._engine  # noqa: SLF001 - the engine thread's own object, to slow it down
    if busy == "reserving":
        original = llm.reserve_kv

        def slow_reserve(num_tokens: int) -> KVReservation:
            time.sleep(SLOW_S)
            return original(num_tokens)

        monkeypatch.setattr(llm, "reserve_kv", slow_reserve)
    try:
        with grpc_server_in_thread(
            lambda server: worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
        ) as server:
            if busy == "queued":
                server.loop.call_soon_threadsafe(
                    lambda: asyncio.ensure_future(engine.call(lambda e: time.sleep(SLOW_S)))
                )
                time.sleep(0.1)
            with grpc.insecure_channel(server.target) as channel:
                stub = worker_pb2_grpc.DecodeWorkerStub(channel)
                request = worker_pb2.ReserveRequest(request_id="r1", num_prompt_tokens=40, max_tokens=8)
                with pytest.raises(grpc.RpcError) as err:
                    stub.Reserve(request, timeout=0.2)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                time.sleep(SLOW_S + 0.5)  # the engine thread has settled the cancelled call by now
                assert engine._thread is not None and engine._thread.is_alive()  # noqa: SLF001
                assert servicer.reservations == {}
                assert free_blocks(engine) == before  # no block leaked
                monkeypatch.undo()
                ok = stub.Reserve(request, timeout=30)  # the worker serves the next reservation
                assert len(ok.block_ids) == 5 and free_blocks(engine) == before - 5
                stub.Release(worker_pb2.ReleaseRequest(transfer_id=ok.transfer_id), timeout=30)
                assert free_blocks(engine) == before
        assert len(served(engine)) == 4  # and the next request
    finally:
        receiver.shutdown()
