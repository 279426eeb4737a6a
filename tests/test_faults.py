"""Faults, each an automated test against real processes: a prefill worker killed mid-request, a Redis
restart (AOF), a router restart (workers re-register)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from conftest import local_cluster_spec

from k2serve.cluster.local import LocalCluster, Proc

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = local_cluster_spec(
        tiny_ckpt,
        tmp_path_factory.mktemp("faults"),
        port=free_port(),
        grpc_port=free_port(),
        internal_port=free_port(),  # a restarted router must listen where the workers register
        num_prefill=2,
        use_redis=True,
        heartbeat_timeout_s=3.0,
    )
    with LocalCluster(spec) as c:
        yield c


def complete(c: LocalCluster, prompt: list[int], max_tokens: int = 4) -> httpx.Response:
    return httpx.post(
        f"{c.http_url}/v1/completions",
        timeout=120,
        json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
    )


def _view(c: LocalCluster) -> dict:
    return httpx.get(f"{c.http_url}/cluster/workers", timeout=10).json()


def test_prefill_worker_killed_mid_request_is_retried(cluster: LocalCluster) -> None:
    """prefill-0 is killed while the router knows it is computing a prefill: every request still
    succeeds (the router retried the failed prefills on prefill-1, and counts the retries)."""
    g = torch.Generator().manual_seed(0)
    long_prompts = [torch.randint(0, 1024, (1500,), generator=g).tolist() for _ in range(6)]
    retries_before = _view(cluster)["prefill_retries"]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(complete, cluster, p) for p in long_prompts]
        deadline = time.monotonic() + 60
        while True:  # kill only once prefill-0 holds an in-flight Prefill call
            prefilling = {w["worker_id"]: w["prefilling"] for w in _view(cluster)["workers"]}
            if prefilling.get("prefill-0", 0) > 0:
                break
            assert time.monotonic() < deadline, "prefill-0 never held a prefill"
            assert not all(f.done() for f in futures), "every request finished before prefill-0 held one"
            time.sleep(0.005)
        cluster.kill("prefill-0")
        results = [f.result() for f in futures]
    assert [r.status_code for r in results] == [200] * 6, [r.text for r in results if r.status_code != 200]
    assert _view(cluster)["prefill_retries"] >= retries_before + 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "prefill-0" in {w["worker_id"] for w in cluster.workers()}:
        time.sleep(0.2)
    assert "prefill-0" not in {w["worker_id"] for w in cluster.workers()}
    assert complete(cluster, [1, 2, 3]).status_code == 200  # serving again within seconds
    # The decode worker's reservations of the failed transfers were released: all its blocks are free.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        dec = [w for w in cluster.workers() if w["role"] == "decode"][0]
        if dec["total_blocks"] and dec["free_blocks"] == dec["total_blocks"]:
            break
        time.sleep(0.3)
    assert dec["free_blocks"] == dec["total_blocks"]


def test_sessions_survive_a_redis_restart(cluster: LocalCluster) -> None:
    assert cluster.redis is not None
    r = httpx.post(
        f"{cluster.http_url}/v1/sessions", json={"messages": [{"role": "user", "content": "hello"}]}
    )
    sid = r.json()["id"]
    cluster.redis.restart()  # same port and data dir: the AOF is replayed
    deadline = time.monotonic() + 10
    status = 0
    while time.monotonic() < deadline:
        got = httpx.get(f"{cluster.http_url}/v1/sessions/{sid}")
        status = got.status_code
        if status == 200:
            break
        assert status == 503  # the store is briefly unreachable: a retriable error, never a lost session
        time.sleep(0.2)
    assert status == 200 and got.json()["num_messages"] == 1


def _kv_index_blocks(c: LocalCluster) -> dict[str, int]:
    return {w["worker_id"]: w["kv_index_blocks"] for w in c.workers() if w["role"] == "prefill"}


def test_router_restart_workers_re_register(cluster: LocalCluster) -> None:
    """The workers register with a restarted router, and their KV snapshots rebuild its KV index exactly
    as their KV events had built it before."""
    assert complete(cluster, list(range(1, 100))).status_code == 200  # 12 full blocks on some prefill worker
    before: dict[str, int] = {}
    deadline = time.monotonic() + 15
    while (
        time.monotonic() < deadline
    ):  # its events arrive on the next heartbeat (1 s): wait for a still index
        now = _kv_index_blocks(cluster)
        if now == before:
            break
        before = now
        time.sleep(1.5)
    assert max(before.values()) >= 12
    router = cluster.procs[0]
    args = list(router.popen.args)  # type: ignore[arg-type]
    os.killpg(router.popen.pid, signal.SIGKILL)
    router.popen.wait()
    (cluster.dir / "router.ready").unlink(missing_ok=True)
    log = cluster.dir / "logs" / "router-restarted.log"
    with open(log, "wb") as f:
        popen = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    cluster.procs[0] = Proc("router", popen, log)
    deadline = time.monotonic() + 20
    workers: list[dict] = []
    while time.monotonic() < deadline:
        try:
            workers = cluster.workers()
            roles = {w["worker_id"]: w["role"] for w in workers}  # prefill-0 may have been killed above
            if "decode-0" in roles and "prefill" in roles.values():
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    assert {"decode-0"} <= {w["worker_id"] for w in workers}
    assert any(w["role"] == "prefill" for w in workers)
    deadline = time.monotonic() + 10
    while _kv_index_blocks(cluster) != before and time.monotonic() < deadline:
        time.sleep(0.2)  # every prefill worker re-registered with its snapshot
    assert _kv_index_blocks(cluster) == before
    assert complete(cluster, [5, 6, 7]).status_code == 200
