"""Acceptance of the disaggregated cluster: real processes (router, prefill and decode workers), real gRPC
and KV transfer, compared token for token with the offline engine."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import torch
from cluster_calls import grpc_greedy, http_greedy
from conftest import local_cluster_spec

from k2serve.cluster.local import ClusterSpec, LocalCluster
from k2serve.config import ModelConfig
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm import LLM
from k2serve.engine.sampling_params import SamplingParams
from k2serve.proto import api_pb2_grpc

pytestmark = pytest.mark.slow

ENGINE_ARGS = ("--kv-cache-mb", "32", "--block-size", "8", "--max-num-batched-tokens", "256")


def cluster_spec(model: Path, workdir: Path, **overrides: object) -> ClusterSpec:
    """The tests' local cluster (conftest.local_cluster_spec) with a 256-token step budget."""
    return local_cluster_spec(model, workdir, engine_args=ENGINE_ARGS, **overrides)


@pytest.fixture(scope="module")
def cluster(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = cluster_spec(tiny_ckpt, tmp_path_factory.mktemp("up"), num_decode=2, heartbeat_timeout_s=3.0)
    with LocalCluster(spec) as c:
        yield c


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 1024, (int(k),), generator=g).tolist()
        for k in torch.randint(3, 90, (n,), generator=g)
    ]


def offline(ckpt: Path, ps: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    llm = LLM(ckpt, engine_config=EngineConfig(num_kv_blocks=1024, block_size=8))
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    return [o.token_ids for o in llm.generate(ps, params)]


def test_http_and_grpc_match_offline_engine(cluster: LocalCluster, tiny_ckpt: Path) -> None:
    ps = prompts(32, seed=1)
    max_tokens = [4 + i % 13 for i in range(32)]
    expected = offline(tiny_ckpt, ps, max_tokens)
    client = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0)

    async def both() -> tuple[list, list]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as ch:
            stub = api_pb2_grpc.K2ServeStub(ch)
            h = asyncio.gather(
                *(http_greedy(client, tiny_ckpt.name, p, m) for p, m in zip(ps, max_tokens, strict=True))
            )
            g = asyncio.gather(*(grpc_greedy(stub, p, m) for p, m in zip(ps, max_tokens, strict=True)))
            return await h, await g

    http_out, grpc_out = asyncio.run(both())
    assert grpc_out == expected
    assert http_out == expected


def test_bytes_transferred_equal_latent_size(cluster: LocalCluster, tiny_ckpt: Path) -> None:
    cfg = ModelConfig.from_file(tiny_ckpt)
    before = httpx.get(f"{cluster.http_url}/cluster/workers").json()["kv_bytes_transferred"]
    p = prompts(1, seed=2)[0]
    r = httpx.post(
        f"{cluster.http_url}/v1/completions",
        json={"prompt": p, "max_tokens": 3, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    after = httpx.get(f"{cluster.http_url}/cluster/workers").json()["kv_bytes_transferred"]
    # tokens x layers x latent width (kv_lora_rank + qk_rope_head_dim) x 4 bytes (fp32 workers)
    assert after - before == len(p) * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


# A seeded sampled request that sets every sampling field the HTTP API takes (n aside: the router
# and `serve` both refuse n > 1). The strong repetition penalty is what the cluster once dropped; at a
# low temperature the random model repeats tokens, so the penalty changes what is sampled.
EVERY_SAMPLING_FIELD = {
    "temperature": 0.05,
    "top_p": 0.95,
    "top_k": 40,
    "min_p": 0.02,
    "seed": 77,
    "max_tokens": 64,
    "min_tokens": 50,
    "stop": ["never-appears"],
    "stop_token_ids": [1023],
    "ignore_eos": True,
    "presence_penalty": 0.3,
    "frequency_penalty": 0.2,
    "repetition_penalty": 2.5,
    "logprobs": 2,
    "skip_special_tokens": False,
}


@pytest.fixture(scope="module")
def serve_url(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`k2serve serve` on the cluster's checkpoint and engine settings, as a process of its own."""
    logdir = tmp_path_factory.mktemp("serve")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "k2serve.cli", "serve", "--model", str(tiny_ckpt), *ENGINE_ARGS]
    with (logdir / "serve.log").open("wb") as log:
        proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (logdir / "serve.log").read_text()
            assert time.monotonic() < deadline, "k2serve serve did not come up"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_every_sampling_field_gives_the_same_tokens_from_serve_and_up(
    cluster: LocalCluster, serve_url: str
) -> None:
    body = {"prompt": prompts(1, seed=5)[0], "return_token_ids": True, **EVERY_SAMPLING_FIELD}
    answers = []
    for url in (serve_url, cluster.http_url):
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        answers.append((choice["token_ids"], choice["logprobs"]["top_logprobs"], choice["finish_reason"]))
    served, clustered = answers
    assert len(served[0]) == EVERY_SAMPLING_FIELD["max_tokens"]
    assert clustered == served
    # the penalty matters: without it the same seed samples other tokens
    plain = httpx.post(
        f"{serve_url}/v1/completions", json=body | {"repetition_penalty": 1.0}, timeout=120
    ).json()
    assert plain["choices"][0]["token_ids"] != served[0]


def _free_blocks(cluster: LocalCluster) -> dict[str, tuple[int, int]]:
    return {w["worker_id"]: (w["free_blocks"], w["total_blocks"]) for w in cluster.workers()}


def _wait_all_free(cluster: LocalCluster, timeout: float = 15.0) -> dict[str, tuple[int, int]]:
    end = time.monotonic() + timeout
    state = _free_blocks(cluster)
    while time.monotonic() < end:
        state = _free_blocks(cluster)
        busy = [w for w in cluster.workers() if w["in_flight"] or w["running"] or w["waiting"]]
        if (
            all(t > 0 for _, t in state.values())
            and not busy
            and all(f == t for wid, (f, t) in state.items() if wid.startswith("decode"))
        ):
            return state
        time.sleep(0.3)
    return state


def test_aborted_client_frees_blocks_on_both_workers(cluster: LocalCluster) -> None:
    p = prompts(1, seed=3)[0] * 3
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST",
            f"{cluster.http_url}/v1/completions",
            json={"prompt": p, "max_tokens": 2000, "temperature": 0, "stream": True, "ignore_eos": True},
        ) as resp,
    ):
        assert resp.status_code == 200
        for lines, _ in enumerate(resp.iter_lines()):
            if lines > 6:
                break  # hang up mid-stream
    state = _wait_all_free(cluster)
    for wid, (free, total) in state.items():
        assert total > 0
        if wid.startswith("decode"):
            assert free == total, f"{wid} still holds {total - free} blocks"
    for w in cluster.workers():
        assert w["in_flight"] == 0 and w["running"] == 0


def test_killed_decode_worker_is_detected_and_routed_around(cluster: LocalCluster) -> None:
    assert {w["worker_id"] for w in cluster.workers()} >= {"decode-0", "decode-1"}
    cluster.kill("decode-1")
    t0 = time.monotonic()
    ok = 0
    for p in prompts(8, seed=4):
        r = httpx.post(
            f"{cluster.http_url}/v1/completions",
            json={"prompt": p, "max_tokens": 4, "temperature": 0, "ignore_eos": True},
            timeout=60,
        )
        ok += r.status_code == 200
        assert r.status_code in (200, 500), r.text
    while time.monotonic() - t0 < 8 and "decode-1" in {w["worker_id"] for w in cluster.workers()}:
        time.sleep(0.2)
    assert "decode-1" not in {w["worker_id"] for w in cluster.workers()}
    assert time.monotonic() - t0 < 8  # removed within the heartbeat timeout (3 s) plus slack
    assert ok >= 7  # at most the request in flight on the dead worker fails; the rest are routed around
    r = httpx.post(
        f"{cluster.http_url}/v1/completions",
        json={"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200


def test_grpc_transfer_backend_cluster_matches_offline_engine(
    tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The gRPC KV backend end to end (the module's cluster uses the default, torch.distributed with
    in-place receives): tokens equal the offline engine's, the bytes moved are the latent's, and
    every block is free afterwards."""
    spec = cluster_spec(tiny_ckpt, tmp_path_factory.mktemp("up-grpc"), transfer_backend="grpc")
    ps = prompts(12, seed=5)
    max_tokens = [3 + i % 7 for i in range(12)]
    expected = offline(tiny_ckpt, ps, max_tokens)
    cfg = ModelConfig.from_file(tiny_ckpt)
    with LocalCluster(spec) as c:
        client = openai.AsyncOpenAI(base_url=f"{c.http_url}/v1", api_key="unused", max_retries=0)

        async def run() -> list[list[int]]:
            return await asyncio.gather(
                *(http_greedy(client, tiny_ckpt.name, p, m) for p, m in zip(ps, max_tokens, strict=True))
            )

        assert asyncio.run(run()) == expected
        moved = httpx.get(f"{c.http_url}/cluster/workers").json()["kv_bytes_transferred"]
        latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        assert moved == sum(len(p) for p in ps) * cfg.num_hidden_layers * latent * 4
        state = _wait_all_free(c)
        assert all(f == t > 0 for wid, (f, t) in state.items() if wid.startswith("decode")), state
