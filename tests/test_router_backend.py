"""ClusterBackend's books (requests in flight, each worker's in-flight count, the decode stream) against
a scripted decode worker served over real gRPC in this process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import grpc

from k2serve.engine.protocol import GenerateRequest, SessionHint
from k2serve.engine.sampling_params import SamplingParams
from k2serve.proto import registry_pb2, worker_pb2, worker_pb2_grpc
from k2serve.router.backend import ClusterBackend
from k2serve.router.registry import WorkerTable


class EndlessDecode(worker_pb2_grpc.DecodeWorkerServicer):
    """Streams one token per chunk (0, 1, 2, ...) until the caller cancels; records that it did."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def Decode(  # noqa: N802
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeChunk]:
        try:
            i = 0
            while True:
                yield worker_pb2.DecodeChunk(token_ids=[i], num_cached_tokens=3)
                i += 1
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def test_client_hanging_up_on_a_session_turn_settles_the_books_at_once(tiny_ckpt: Path) -> None:
    """A client that stops reading a session turn served by its holder (no prefill worker) leaves no
    request in flight, the holder's in-flight count back at 0, and the decode stream cancelled, all
    by the time the stream is closed (not whenever the garbage collector finalizes it)."""

    async def run() -> None:
        servicer = EndlessDecode()
        server = grpc.aio.server()
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        table = WorkerTable(5.0, grpc.aio.insecure_channel)
        table.add(
            registry_pb2.WorkerInfo(
                worker_id="decode-0",
                role=registry_pb2.WORKER_ROLE_DECODE,
                grpc_address=f"127.0.0.1:{port}",
                ready=True,
            )
        )
        table.add(  # never called: the turn goes to its holder
            registry_pb2.WorkerInfo(
                worker_id="prefill-0",
                role=registry_pb2.WORKER_ROLE_PREFILL,
                grpc_address="127.0.0.1:1",
                ready=True,
            )
        )
        backend = ClusterBackend(tiny_ckpt, table)
        hint = SessionHint("s-1", holder="decode-0", cached_tokens=4)  # the whole prompt: served by it
        req = GenerateRequest("turn-1", [1, 2, 3, 4], SamplingParams(max_tokens=1000), session=hint)
        received: list[int] = []
        events = await backend.generate(req)
        async with aclosing(events):
            async for ev in events:
                received += ev.token_ids
                assert (ev.num_prompt_tokens, ev.num_cached_tokens) == (4, 3)
                if len(received) == 3:
                    break  # the client hangs up mid-stream
        assert received == [0, 1, 2]
        assert backend.local_prefills == 1
        assert backend.in_flight == {}
        assert table.workers["decode-0"].in_flight == 0
        await asyncio.wait_for(servicer.cancelled.wait(), timeout=5)
        for _ in range(10):  # nothing settles the books a second time later on
            await asyncio.sleep(0.01)
        assert backend.in_flight == {}
        assert table.workers["decode-0"].in_flight == 0
        await server.stop(None)

    asyncio.run(run())
