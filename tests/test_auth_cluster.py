"""The control plane from the outside, as an attacker tries it: a real `k2serve up`-style cluster (router,
prefill and decode workers as processes, Redis sessions, gRPC KV transfer) with API keys.

Every door is tried without a credential, with a wrong one and with a user's API key (which is never a
worker credential): the public gRPC API and HTTP API, the worker registry on the public port (not
served there) and on the router's internal listener, and the workers' own services and KV receiver.
Afterwards the cluster still serves its real clients the offline engine's tokens and lists no rogue.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import local_cluster_spec

from k2serve.cluster.local import LocalCluster
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm import LLM
from k2serve.engine.sampling_params import SamplingParams
from k2serve.proto import (
    api_pb2,
    api_pb2_grpc,
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from k2serve.rpc.auth import CLUSTER_TOKEN_HEADER

pytestmark = pytest.mark.slow

KEY, OTHER_KEY = "sk-auth-test-alice", "sk-auth-test-bob"
PROMPT = [5, 17, 99, 3, 250, 8, 41]
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def cluster(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = local_cluster_spec(
        tiny_ckpt,
        tmp_path_factory.mktemp("auth"),
        api_key=f"{KEY},{OTHER_KEY}",
        use_redis=True,
        transfer_backend="grpc",  # a KV receiver that gRPC callers can reach
    )
    with LocalCluster(spec) as c:
        yield c


@pytest.fixture(scope="module")
def expected(tiny_ckpt: Path) -> list[int]:
    llm = LLM(tiny_ckpt, engine_config=EngineConfig(num_kv_blocks=256, block_size=8))
    return llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].token_ids


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def cluster_token(c: LocalCluster) -> str:
    assert c.spec.cluster_token_file is not None
    return Path(c.spec.cluster_token_file).read_text().strip()


def code_of(call: object, *args: object, **kwargs: object) -> grpc.StatusCode:
    try:
        result = call(*args, timeout=30, **kwargs)  # type: ignore[operator]
        if hasattr(result, "__next__"):  # a streamed response: the status comes with its end
            for _ in result:
                pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def generate(stub: api_pb2_grpc.K2ServeStub, metadata: tuple[tuple[str, str], ...] = ()) -> list[int]:
    req = api_pb2.GenerateRequest(
        token_ids=api_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
    )
    return [t for chunk in stub.Generate(req, timeout=60, metadata=metadata) for t in chunk.token_ids]


def test_public_grpc_api_needs_an_api_key(cluster: LocalCluster, expected: list[int]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as ch:
        stub = api_pb2_grpc.K2ServeStub(ch)
        with pytest.raises(grpc.RpcError) as err:  # no key at all
            generate(stub)
        assert err.value.code() == UNAUTH
        token = cluster_token(cluster)  # the cluster's credential is not a user key either
        for metadata in ((), bearer("sk-wrong"), bearer(token), ((CLUSTER_TOKEN_HEADER, token),)):
            with pytest.raises(grpc.RpcError) as err:
                generate(stub, metadata)
            assert err.value.code() == UNAUTH, metadata
            for call, req in (
                (stub.ListModels, api_pb2.ListModelsRequest()),
                (stub.CreateSession, api_pb2.CreateSessionRequest()),
                (stub.GetSession, api_pb2.GetSessionRequest(session_id="s")),
            ):
                assert code_of(call, req, metadata=metadata) == UNAUTH
        assert generate(stub, bearer(KEY)) == expected
        assert generate(stub, bearer(OTHER_KEY)) == expected


def test_sessions_belong_to_the_key_over_grpc_as_over_http(cluster: LocalCluster) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as ch:
        stub = api_pb2_grpc.K2ServeStub(ch)
        session = stub.CreateSession(api_pb2.CreateSessionRequest(), timeout=30, metadata=bearer(KEY))
        get = api_pb2.GetSessionRequest(session_id=session.id)
        assert stub.GetSession(get, timeout=30, metadata=bearer(KEY)).id == session.id
        assert code_of(stub.GetSession, get, metadata=bearer(OTHER_KEY)) == grpc.StatusCode.NOT_FOUND
    url = f"{cluster.http_url}/v1/sessions/{session.id}"
    assert httpx.get(url, headers={"authorization": f"Bearer {KEY}"}, timeout=30).status_code == 200
    assert httpx.get(url, headers={"authorization": f"Bearer {OTHER_KEY}"}, timeout=30).status_code == 404
    assert httpx.get(url, timeout=30).status_code == 401


def test_http_needs_an_api_key(cluster: LocalCluster) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    for path in ("/v1/completions", "/cluster/workers"):
        method = "POST" if path == "/v1/completions" else "GET"
        for headers in ({}, {"authorization": "Bearer sk-wrong"}, {"authorization": "Basic " + KEY}):
            r = httpx.request(method, cluster.http_url + path, json=body, headers=headers, timeout=60)
            assert r.status_code == 401, (path, headers, r.text)
        r = httpx.request(
            method, cluster.http_url + path, json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=60
        )
        assert r.status_code == 200, r.text


def rogue_calls(ch: grpc.Channel) -> list[tuple[str, object, object]]:
    stub = registry_pb2_grpc.WorkerRegistryStub(ch)
    rogue = registry_pb2.WorkerInfo(
        worker_id="rogue",
        role=registry_pb2.WORKER_ROLE_DECODE,
        grpc_address="127.0.0.1:1",
        capacity=registry_pb2.WorkerCapacity(free_blocks=1 << 20, total_blocks=1 << 20, max_batch=256),
    )
    return [
        ("Register", stub.Register, rogue),
        ("Deregister", stub.Deregister, registry_pb2.DeregisterRequest(worker_id="decode-0")),
        ("Heartbeat", stub.Heartbeat, registry_pb2.HeartbeatRequest(worker_id="decode-0")),
    ]


def test_the_registry_is_not_on_the_public_port(cluster: LocalCluster) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as ch:
        for name, call, req in rogue_calls(ch):
            for metadata in ((), bearer(KEY)):
                assert code_of(call, req, metadata=metadata) == grpc.StatusCode.UNIMPLEMENTED, name


def test_the_internal_listener_refuses_all_but_the_cluster(cluster: LocalCluster) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{cluster.internal_port}") as ch:
        for name, call, req in rogue_calls(ch):
            for metadata in (
                (),
                bearer(KEY),
                ((CLUSTER_TOKEN_HEADER, KEY),),
                ((CLUSTER_TOKEN_HEADER, "x" * 43),),
            ):
                assert code_of(call, req, metadata=metadata) == UNAUTH, (name, metadata)
        # The same door opens to the cluster's credential: a heartbeat for an unknown id is answered.
        hb = registry_pb2_grpc.WorkerRegistryStub(ch).Heartbeat(
            registry_pb2.HeartbeatRequest(worker_id="nobody"),
            timeout=30,
            metadata=((CLUSTER_TOKEN_HEADER, cluster_token(cluster)),),
        )
        assert not hb.known


def test_workers_refuse_calls_without_the_cluster_credential(cluster: LocalCluster) -> None:
    workers = {w["role"]: w["address"] for w in cluster.workers()}
    token = ((CLUSTER_TOKEN_HEADER, cluster_token(cluster)),)
    with grpc.insecure_channel(workers["decode"]) as ch:
        stub = worker_pb2_grpc.DecodeWorkerStub(ch)
        reserve = worker_pb2.ReserveRequest(request_id="rogue", num_prompt_tokens=8, max_tokens=1)
        for metadata in ((), bearer(KEY)):
            assert code_of(stub.Reserve, reserve, metadata=metadata) == UNAUTH
            assert code_of(stub.Release, worker_pb2.ReleaseRequest(), metadata=metadata) == UNAUTH
        # An insider learns the KV receiver's address (and gives the blocks back at once).
        reserved = stub.Reserve(reserve, timeout=30, metadata=token)
        stub.Release(worker_pb2.ReleaseRequest(transfer_id=reserved.transfer_id), timeout=30, metadata=token)
    assert reserved.endpoint.backend == "grpc"
    with grpc.insecure_channel(reserved.endpoint.address) as ch:
        push = ch.stream_unary("/k2serve.internal.v1.KVTransfer/Push")
        for metadata in ((), bearer(KEY)):
            assert code_of(push, iter([b"\x0a\x01x"]), metadata=metadata) == UNAUTH
    with grpc.insecure_channel(workers["prefill"]) as ch:
        prefill = worker_pb2_grpc.PrefillWorkerStub(ch).Prefill
        req = worker_pb2.PrefillRequest(request_id="rogue", prompt_token_ids=PROMPT)
        for metadata in ((), bearer(KEY)):
            assert code_of(prefill, req, metadata=metadata) == UNAUTH


def test_the_cluster_still_serves_and_lists_no_rogue(cluster: LocalCluster, expected: list[int]) -> None:
    """Runs after the attacks above (pytest keeps file order)."""
    assert sorted(w["worker_id"] for w in cluster.workers()) == ["decode-0", "prefill-0"]
    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as ch:
        assert generate(api_pb2_grpc.K2ServeStub(ch), bearer(KEY)) == expected
    r = httpx.post(
        f"{cluster.http_url}/v1/completions",
        headers={"authorization": f"Bearer {KEY}"},
        json={
            "prompt": PROMPT,
            "max_tokens": 6,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == expected
    for p in cluster.procs:
        assert p.popen.poll() is None, f"{p.name} died:\n{p.tail()}"


def test_a_router_without_a_cluster_credential_does_not_start(tiny_ckpt: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "k2serve",
            "router",
            "--model",
            str(tiny_ckpt),
            "--port",
            "0",
            "--grpc-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "K2SERVE_CLUSTER_TOKEN_FILE"},
    )
    assert out.returncode != 0
    assert "--cluster-token-file" in out.stderr and "--insecure-internal" in out.stderr, out.stderr
