"""Router admission control: early rejection by predicted TTFT, the in-flight cap, and routing policy."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from k2serve.engine.protocol import GenerateRequest, QueueFullError
from k2serve.engine.sampling_params import SamplingParams
from k2serve.proto import registry_pb2
from k2serve.router.backend import ClusterBackend
from k2serve.router.policy import LeastLoaded, NoWorkerError
from k2serve.router.registry import WorkerTable


def _table(n_prefill: int, n_decode: int) -> WorkerTable:
    table = WorkerTable(5.0, grpc.aio.insecure_channel)
    for role, n, code in (
        ("prefill", n_prefill, registry_pb2.WORKER_ROLE_PREFILL),
        ("decode", n_decode, registry_pb2.WORKER_ROLE_DECODE),
    ):
        for i in range(n):
            table.add(
                registry_pb2.WorkerInfo(
                    worker_id=f"{role}-{i}", role=code, grpc_address=f"127.0.0.1:{1 + i}", ready=True
                )
            )
    return table


def test_predicted_ttft_rejects_before_any_work(tiny_ckpt: Path) -> None:
    async def run() -> None:
        backend = ClusterBackend(tiny_ckpt, _table(2, 1), max_predicted_ttft_s=1.0)
        req = GenerateRequest("r1", list(range(1, 201)), SamplingParams(max_tokens=4))
        assert backend.predicted_ttft_s(200) is None  # nothing measured yet: admit
        backend._observe_prefill(1000, 1000.0)  # 1000 tokens/s per prefill worker
        backend.pending_prefill_tokens = 1500
        # (1500 + 200) tokens / (1000 tok/s x 2 workers) = 0.85 s <= 1.0 s: admitted (the stream is lazy)
        stream = await backend.generate(req)
        await stream.aclose()
        backend.in_flight.clear()
        backend.pending_prefill_tokens = 2500  # (2500 + 200) / 2000 = 1.35 s > 1.0 s
        with pytest.raises(QueueFullError) as e:
            await backend.generate(GenerateRequest("r2", list(range(1, 201)), SamplingParams(max_tokens=4)))
        assert e.value.retry_after_s >= 1.0
        assert backend.rejected == 1 and "r2" not in backend.in_flight  # nothing was started

    asyncio.run(run())


def test_in_flight_cap(tiny_ckpt: Path) -> None:
    async def run() -> None:
        backend = ClusterBackend(tiny_ckpt, _table(1, 1), max_in_flight=2)
        for i in range(2):
            await backend.generate(GenerateRequest(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=2)))
        with pytest.raises(QueueFullError):
            await backend.generate(GenerateRequest("r9", [1, 2, 3], SamplingParams(max_tokens=2)))

    asyncio.run(run())


def test_least_loaded_policy() -> None:
    async def run() -> None:
        table = _table(0, 3)
        ws = table.of_role("decode")
        ws[0].in_flight, ws[1].in_flight, ws[2].in_flight = 3, 1, 1
        ws[1].load.free_blocks, ws[2].load.free_blocks = 10, 50
        policy = LeastLoaded()
        assert policy.pick(ws, "decode").worker_id == "decode-2"  # tie on load, more free blocks
        assert policy.pick(ws, "decode", frozenset({"decode-2"})).worker_id == "decode-1"
        with pytest.raises(NoWorkerError):
            policy.pick(ws, "decode", frozenset(w.worker_id for w in ws))

    asyncio.run(run())
