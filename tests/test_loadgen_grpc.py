"""The gRPC path of the load generator against a scripted test server: an in-process grpc server whose
K2ServeServicer.Generate streams one chunk per token (the real router is tested elsewhere)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from k2serve.loadgen.benchmark import run_benchmark
from k2serve.loadgen.config import BenchConfig
from k2serve.proto import api_pb2, api_pb2_grpc, common_pb2

pytestmark = pytest.mark.timeout(60)
TOKEN_GAP_S = 0.002


class ScriptedK2Serve(api_pb2_grpc.K2ServeServicer):
    """Generate: max_tokens tokens, one per chunk, TOKEN_GAP_S apart; usage on the last chunk with half the
    prompt cached. Model "busy" is refused with RESOURCE_EXHAUSTED, "broken" fails with INTERNAL."""

    def __init__(self) -> None:
        self.requests: list[api_pb2.GenerateRequest] = []
        self.auth: list[str | None] = []

    def Generate(  # noqa: N802 - the generated servicer's name
        self, request: api_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.GenerateResponse]:
        self.requests.append(request)
        self.auth.append(dict(context.invocation_metadata()).get("authorization"))
        if request.model == "busy":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        if request.model == "broken":
            context.abort(grpc.StatusCode.INTERNAL, "scripted failure")
        n_prompt, n_out = len(request.token_ids.ids), request.sampling.max_tokens
        for i in range(n_out):
            time.sleep(TOKEN_GAP_S)
            last = i == n_out - 1
            yield api_pb2.GenerateResponse(
                request_id="r",
                token_ids=[7],
                finish_reason=common_pb2.FINISH_REASON_LENGTH
                if last
                else common_pb2.FINISH_REASON_UNSPECIFIED,
                usage=common_pb2.Usage(
                    prompt_tokens=n_prompt, completion_tokens=n_out, cached_tokens=n_prompt // 2
                )
                if last
                else None,
            )


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[ScriptedK2Serve, str]]:
    servicer = ScriptedK2Serve()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    api_pb2_grpc.add_K2ServeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"grpc://127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_grpc_generate_is_timed_token_by_token(scripted: tuple[ScriptedK2Serve, str]) -> None:
    servicer, url = scripted
    servicer.requests.clear()
    config = BenchConfig(
        backend="grpc", url=url, api_key="k", num_prompts=12, max_concurrency=4, input_len=(6, 10),
        output_len=(5, 9), vocab_size=100, seed=1, slo_ttft_ms=1000, progress_interval_s=60,
    )  # fmt: skip
    result = run_benchmark(config, "cmd")
    assert result["counts"]["completed"] == 12 and result["errors"] == {} and result["rejections"] == {}
    sent = sorted(servicer.requests, key=lambda r: len(r.token_ids.ids))
    assert all(r.sampling.ignore_eos and r.sampling.temperature == 0.0 for r in sent)
    assert set(servicer.auth) == {"Bearer k"}
    by_index = result["requests"]
    assert all(r["output_tokens"] == r["requested_output_len"] == r["num_chunks"] for r in by_index)
    assert {r.sampling.max_tokens for r in sent} == {r["requested_output_len"] for r in by_index}
    assert result["counts"]["output_len_mismatch"] == 0
    itl = result["latency_ms"]["itl"]
    assert itl["n"] == sum(r["output_tokens"] - 1 for r in by_index)
    assert itl["p50"] >= TOKEN_GAP_S * 1e3 * 0.9
    pc = result["prefix_cache"]
    assert pc["cached_tokens"] == sum(r["prompt_len"] // 2 for r in by_index)
    assert pc["prompt_tokens"] == sum(r["prompt_len"] for r in by_index)
    assert result["goodput"]["fraction"] == 1.0


def test_grpc_refusals_and_failures_are_counted_apart(scripted: tuple[ScriptedK2Serve, str]) -> None:
    _, url = scripted
    busy = run_benchmark(
        BenchConfig(backend="grpc", url=url, model="busy", num_prompts=3, progress_interval_s=60), "c"
    )
    assert busy["counts"]["rejected"] == 3 and busy["rejections"] == {"RESOURCE_EXHAUSTED": 3}
    assert busy["counts"]["completed"] == 0 and busy["errors"] == {}
    broken = run_benchmark(
        BenchConfig(backend="grpc", url=url, model="broken", num_prompts=2, progress_interval_s=60), "c"
    )
    assert broken["errors"] == {"INTERNAL": 2} and broken["counts"]["failed"] == 2
    assert broken["requests"][0]["error_detail"] == "scripted failure"
