"""TLS and mutual TLS on every hop, with the `pki` fixture's certificates (conftest: a CA, and one
leaf for 127.0.0.1 and localhost used by every process and by the test's client). Fast: the flags, the
file checks and the KV transfer backend over mTLS. Slow: a whole cluster over mTLS answers like the
plaintext offline engine, and refuses clients without a certificate or without TLS."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import httpx
import pytest
import torch
from conftest import local_cluster_spec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from k2serve.cli import build_parser, main
from k2serve.cli.settings import tls_files
from k2serve.cluster.local import ClusterSpec, LocalCluster
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm import LLM
from k2serve.engine.sampling_params import SamplingParams
from k2serve.proto import api_pb2, api_pb2_grpc, common_pb2
from k2serve.rpc.tls import TLSConfigError, TLSFiles
from k2serve.transfer import KVReceiver, TransferError, make_receiver, make_sender

if TYPE_CHECKING:
    from conftest import PKI  # the `pki` fixture's certificates

ENGINE_ARGS = ("--kv-cache-mb", "32", "--block-size", "8", "--max-num-batched-tokens", "256")


# ---- flags and files -------------------------------------------------------------------------------


def test_flags_build_tls_files_or_none(pki: PKI) -> None:
    p = build_parser()
    base = ["prefill", "--model", "m"]
    assert tls_files(p.parse_args(base)) is None
    flags = ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--tls-ca", str(pki.ca)]
    tls = tls_files(p.parse_args([*base, *flags, "--tls-server-name", "localhost"]))
    assert tls == TLSFiles(str(pki.cert), str(pki.key), str(pki.ca), "localhost") and tls.mutual
    assert p.parse_args(["router", "--model", "m", *tls.argv()]).tls_server_name == "localhost"
    assert p.parse_args(["up", "--preset", "tiny", *flags]).tls_ca == str(pki.ca)
    with pytest.raises(TLSConfigError, match="need --tls-cert and --tls-key"):
        tls_files(p.parse_args([*base, "--tls-ca", str(pki.ca)]))
    with pytest.raises(TLSConfigError, match="go together"):
        tls_files(p.parse_args([*base, "--tls-cert", str(pki.cert)]))


def test_bad_files_are_named(pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match="no such file") as e:
        TLSFiles(str(pki.cert), str(tmp_path / "missing.key"))
    assert e.value.value == str(tmp_path / "missing.key")
    with pytest.raises(TLSConfigError, match="not a matching PEM pair"):
        TLSFiles(str(pki.cert), str(pki.other_key))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(TLSConfigError, match="--tls-ca"):
        TLSFiles(str(pki.cert), str(pki.key), str(tmp_path / "junk.pem"))


def test_torch_transfer_backend_is_refused_with_tls(
    pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(TLSConfigError, match="plaintext"):
        ClusterSpec(model_dir=str(tmp_path), transfer_backend="torch", tls=pki.files)
    argv = ["decode", "--model", str(tmp_path), "--transfer-backend", "torch", *pki.files.argv()]
    assert main(argv) == 2
    assert "torch.distributed has no TLS" in capsys.readouterr().err


# ---- KV transfer backend ---------------------------------------------------------------------------


def _push(sender_options: dict, receiver_endpoint: str, receiver: KVReceiver, tid: str) -> torch.Tensor:
    got: list[torch.Tensor] = []
    receiver.expect(tid, 1, 4, 8, torch.float32, lambda layer, t: got.append(t.clone()))
    sender = make_sender("grpc", receiver_endpoint, **sender_options)
    try:
        kv = torch.arange(32, dtype=torch.float32).reshape(4, 8)
        sender.open(tid, 1, 4, 8, torch.float32)
        sender.send_layer(tid, 0, kv)
        sender.close(tid, 5)
        receiver.wait(tid, 5)
        assert torch.equal(got[0], kv)
        return kv
    finally:
        sender.shutdown()


def test_grpc_kv_transfer_over_mutual_tls(pki: PKI) -> None:
    tls = pki.files
    receiver = make_receiver("grpc", "127.0.0.1:0", credentials=tls.server_credentials())
    try:
        _push({"credentials": tls.channel_credentials()}, receiver.endpoint, receiver, "ok")
        port = receiver.endpoint.rsplit(":", 1)[1]
        _push(  # the name in the certificate, not the host dialled
            {"credentials": tls.channel_credentials(), "server_name": "localhost"},
            f"localhost:{port}",
            receiver,
            "by-name",
        )
        refused = {
            "no client certificate": {"credentials": grpc.ssl_channel_credentials(pki.ca.read_bytes())},
            "client of another CA": {
                "credentials": grpc.ssl_channel_credentials(
                    pki.ca.read_bytes(), pki.other_key.read_bytes(), pki.other_cert.read_bytes()
                )
            },
            "plaintext": {},
        }
        for why, options in refused.items():
            with pytest.raises(TransferError, match="UNAVAILABLE"):
                _push(options, receiver.endpoint, receiver, why.replace(" ", "-"))
            receiver.cancel(why.replace(" ", "-"))
    finally:
        receiver.shutdown()


# ---- the whole cluster -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(
    pki: PKI, tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    spec = local_cluster_spec(
        tiny_ckpt, tmp_path_factory.mktemp("up-tls"), engine_args=ENGINE_ARGS, tls=pki.files
    )
    with LocalCluster(spec) as c:
        yield c


def _generate(target: str, credentials: grpc.ChannelCredentials | None, prompt: list[int]) -> list[int]:
    async def go() -> list[int]:
        channel = (
            grpc.aio.insecure_channel(target)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials)
        )
        async with channel:
            req = api_pb2.GenerateRequest(
                token_ids=api_pb2.TokenIds(ids=prompt),
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
            )
            out: list[int] = []
            async for chunk in api_pb2_grpc.K2ServeStub(channel).Generate(req, timeout=30):
                out += chunk.token_ids
            return out

    return asyncio.run(go())


def _health(target: str, credentials: grpc.ChannelCredentials | None) -> int:
    channel = (
        grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=3).status


@pytest.mark.slow
def test_cluster_over_mutual_tls(tls_cluster: LocalCluster, pki: PKI, tiny_ckpt: Path) -> None:
    prompt = list(range(5, 40))
    llm = LLM(tiny_ckpt, engine_config=EngineConfig(num_kv_blocks=256, block_size=8))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = llm.generate([prompt], params)[0].token_ids

    assert tls_cluster.http_url.startswith("https://")
    verify = ssl.create_default_context(cafile=str(pki.ca))
    with httpx.Client(base_url=tls_cluster.http_url, verify=verify, timeout=60) as http:
        r = http.post(
            "/v1/completions",
            json={
                "prompt": prompt,
                "max_tokens": 6,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == expected
        view = http.get("/cluster/workers").json()
    # both workers registered over mTLS, and the KV went prefill -> decode (over mTLS too)
    assert sorted(w["worker_id"] for w in view["workers"]) == ["decode-0", "prefill-0"]
    assert view["kv_bytes_transferred"] > 0
    for w in view["workers"]:  # each worker's metrics over HTTPS with its certificate (the gRPC KV backend)
        assert w["metrics_url"].startswith("https://127.0.0.1:")
        metrics = httpx.get(w["metrics_url"], verify=verify, timeout=10).text
        assert f'vllm:request_success_total{{engine="{w["worker_id"]}"' in metrics
        assert 'k2serve_kv_transfer_bytes_total{backend="grpc"' in metrics

    router = f"127.0.0.1:{tls_cluster.grpc_port}"
    mtls = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.key.read_bytes(), pki.cert.read_bytes())
    assert _generate(router, mtls, prompt) == expected
    no_cert = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    for refused in (no_cert, None):  # mTLS demands a client certificate; plaintext never gets in
        with pytest.raises(grpc.RpcError) as e:
            _generate(router, refused, prompt)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # the workers' own gRPC servers (router -> worker hop) answer only mTLS clients
    for w in view["workers"]:
        assert _health(w["address"], mtls) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError):
            _health(w["address"], None)
    with httpx.Client(timeout=5) as plain, pytest.raises(httpx.HTTPError):
        plain.get(tls_cluster.http_url.replace("https://", "http://") + "/cluster/workers")
