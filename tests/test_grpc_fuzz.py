"""Bad input on the gRPC APIs: hypothesis over the public messages, raw garbage bytes on every method
(public and internal), oversized messages. The answer is a status naming the problem, never a crashed
process or a leaked block, and the cluster serves normally afterwards."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import local_cluster_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2serve.cluster.local import LocalCluster
from k2serve.proto import api_pb2, api_pb2_grpc, common_pb2
from k2serve.rpc.auth import CLUSTER_TOKEN_HEADER

pytestmark = pytest.mark.slow
OK_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}


@pytest.fixture(scope="module")
def cluster(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = local_cluster_spec(tiny_ckpt, tmp_path_factory.mktemp("fuzz"))
    with LocalCluster(spec) as c:
        yield c


sampling = st.builds(
    common_pb2.SamplingParams,
    temperature=st.floats(-2, 5, allow_nan=False, width=32),
    top_p=st.floats(-1, 2, allow_nan=False, width=32),
    top_k=st.integers(-5, 5000),
    max_tokens=st.integers(0, 300000),
    min_tokens=st.integers(0, 40),
    stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=3),
    logprobs=st.integers(0, 3000),
)
prompts = st.one_of(
    st.builds(
        lambda ids: api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=ids)),
        st.lists(st.integers(0, 2**32 - 1), max_size=40),
    ),
    st.builds(lambda t: api_pb2.GenerateRequest(text=t), st.text(max_size=60)),
)


def _drain(call) -> grpc.StatusCode:  # noqa: ANN001
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_generate_fuzz(cluster: LocalCluster) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as ch:
        stub = api_pb2_grpc.K2ServeStub(ch)

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(prompts, sampling)
        def one(req: api_pb2.GenerateRequest, sp: common_pb2.SamplingParams) -> None:
            req.sampling.CopyFrom(sp)
            req.sampling.max_tokens = (
                min(req.sampling.max_tokens, 8) if req.sampling.max_tokens < 1000 else req.sampling.max_tokens
            )
            code = _drain(stub.Generate(req, timeout=60))
            assert code in OK_CODES, code

        one()


def test_garbage_bytes_on_every_method(cluster: LocalCluster) -> None:
    workers = {w["role"]: w["address"] for w in cluster.workers()}
    # The internal services are fuzzed as an insider would (with the cluster token): their parsers too
    # must answer garbage with a status, not a crash. Outsiders never reach them (test_auth_cluster.py).
    assert cluster.spec.cluster_token_file is not None
    token = ((CLUSTER_TOKEN_HEADER, Path(cluster.spec.cluster_token_file).read_text().strip()),)
    targets = [
        (f"127.0.0.1:{cluster.grpc_port}", "/k2serve.v1.K2Serve/Generate", "stream"),
        (f"127.0.0.1:{cluster.grpc_port}", "/k2serve.v1.K2Serve/Chat", "stream"),
        (f"127.0.0.1:{cluster.internal_port}", "/k2serve.internal.v1.WorkerRegistry/Register", "unary"),
        (workers["prefill"], "/k2serve.internal.v1.PrefillWorker/Prefill", "unary"),
        (workers["decode"], "/k2serve.internal.v1.DecodeWorker/Reserve", "unary"),
        (workers["decode"], "/k2serve.internal.v1.DecodeWorker/Decode", "stream"),
    ]
    garbage = [b"\xff" * 7, b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256)), b"\x12\x05hello" * 3]
    for addr, method, kind in targets:
        with grpc.insecure_channel(addr) as ch:
            for blob in garbage:
                if kind == "unary":
                    call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
                    try:
                        call(blob, timeout=20, metadata=token)
                        code = grpc.StatusCode.OK
                    except grpc.RpcError as e:
                        code = e.code()
                else:
                    code = _drain(
                        ch.unary_stream(method, request_serializer=None, response_deserializer=None)(
                            blob, timeout=20, metadata=token
                        )
                    )
                assert (
                    code in OK_CODES | {grpc.StatusCode.INTERNAL} and code != grpc.StatusCode.UNAVAILABLE
                ), (method, blob[:8], code)
    # An oversized message is refused by size, not by a crash.
    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as ch:
        big = api_pb2.GenerateRequest(text="x" * (80 << 20))
        code = _drain(api_pb2_grpc.K2ServeStub(ch).Generate(big, timeout=60))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_still_serving_and_nothing_leaked(cluster: LocalCluster) -> None:
    for p in cluster.procs:
        assert p.popen.poll() is None, f"{p.name} died:\n{p.tail()}"
    r = httpx.post(
        f"{cluster.http_url}/v1/completions",
        json={"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        dec = [w for w in cluster.workers() if w["role"] == "decode"][0]
        if dec["total_blocks"] and dec["free_blocks"] == dec["total_blocks"] and not dec["in_flight"]:
            break
        time.sleep(0.3)
    assert dec["free_blocks"] == dec["total_blocks"]
