"""GRPCClient: `K2Serve.Generate` (server-streaming) with token-id prompts, timed chunk by chunk."""

from __future__ import annotations

import asyncio
import time

import grpc

from k2serve.loadgen.client import Client
from k2serve.loadgen.config import grpc_target
from k2serve.loadgen.dataset import BenchRequest
from k2serve.loadgen.record import RequestRecord
from k2serve.proto import api_pb2, api_pb2_grpc, common_pb2

REJECTED_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})


class GRPCClient(Client):
    """Calls Generate on the one target of `url`; a chunk with token_ids marks output tokens and the last
    chunk's usage gives output, prompt and cached tokens. RESOURCE_EXHAUSTED counts as a rejection."""

    def __init__(
        self, url: str, model: str | None, api_key: str | None, timeout_s: float, temperature: float = 0.0
    ) -> None:
        super().__init__(timeout_s)
        target, tls = grpc_target(url)
        options = [("grpc.enable_http_proxy", 0)]  # the target is the only address contacted
        self._channel = (
            grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(), options=options)
            if tls
            else grpc.aio.insecure_channel(target, options=options)
        )
        self._stub = api_pb2_grpc.K2ServeStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._model = model or ""
        self._temperature = temperature

    def message(self, req: BenchRequest) -> api_pb2.GenerateRequest:
        return api_pb2.GenerateRequest(
            model=self._model,
            token_ids=api_pb2.TokenIds(ids=req.prompt),
            sampling=common_pb2.SamplingParams(
                max_tokens=req.output_len, ignore_eos=True, temperature=self._temperature
            ),
        )

    async def send(self, req: BenchRequest, t0: float) -> RequestRecord:
        rec = self.new_record(req, t0)
        call = self._stub.Generate(self.message(req), timeout=self.timeout_s, metadata=self._metadata)
        finished = False
        n_tokens = 0
        try:
            async with asyncio.timeout(self.timeout_s + 1.0):  # the deadline above ends it first
                async for chunk in call:
                    now = time.perf_counter() - t0
                    if chunk.token_ids:
                        n_tokens += len(chunk.token_ids)
                        if rec.first_token_s is None:
                            rec.first_token_s = now
                        rec.chunk_s.append(now)
                    if chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                        finished = True
                        if chunk.finish_reason == common_pb2.FINISH_REASON_ABORT:
                            rec.error, rec.error_detail = "aborted", "finish_reason ABORT"
                        if chunk.HasField("usage"):
                            rec.output_tokens = chunk.usage.completion_tokens
                            rec.prompt_tokens = chunk.usage.prompt_tokens
                            rec.cached_tokens = chunk.usage.cached_tokens
            if not finished and rec.error is None:
                rec.error, rec.error_detail = "incomplete_stream", "the stream ended without a finish_reason"
            elif rec.output_tokens is None:
                rec.output_tokens = n_tokens
        except grpc.aio.AioRpcError as e:
            code = e.code()
            rec.error = "timeout" if code == grpc.StatusCode.DEADLINE_EXCEEDED else code.name
            rec.rejected = code in REJECTED_CODES
            rec.error_detail = (e.details() or "")[:500]
        except TimeoutError:
            call.cancel()
            rec.error, rec.error_detail = "timeout", f"no end within {self.timeout_s} s"
        except asyncio.CancelledError:
            call.cancel()
            raise
        rec.finish_s = time.perf_counter() - t0
        return rec

    async def aclose(self) -> None:
        await self._channel.close()
