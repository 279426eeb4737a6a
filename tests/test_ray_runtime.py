"""`k2serve up --ray` on a multi-node Ray cluster simulated on this machine (ray.cluster_utils): the
same tokens as the local launcher, worker groups spread over nodes, and a killed worker actor (or its
process) restarted by Ray, registered again and serving."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from k2serve.cluster.local import ClusterSpec, LocalCluster

ray = pytest.importorskip("ray")

from k2serve.cluster.ray_plan import RayOptions  # noqa: E402
from k2serve.cluster.ray_runtime import RayCluster  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MB = 1024 * 1024
ENGINE_ARGS = ("--kv-cache-mb", "16", "--block-size", "8", "--max-num-batched-tokens", "256")
ENV = {"OMP_NUM_THREADS": "1"}  # same torch threading under both launchers (Ray sets it for actors)
OPTIONS = RayOptions(rank_resources={"CPU": 0.5}, router_resources={"CPU": 0.25}, max_restarts=2)


def spec(ckpt: Path, workdir: Path) -> ClusterSpec:
    return ClusterSpec(
        model_dir=str(ckpt),
        port=0,
        grpc_port=0,
        num_prefill=1,
        num_decode=1,
        use_redis=False,
        engine_args=ENGINE_ARGS,
        workdir=str(workdir),
        heartbeat_timeout_s=3.0,
        startup_timeout_s=120.0,
        env=ENV,
    )


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 1024, (int(n),), generator=g).tolist() for n in (3, 17, 40, 64, 9)]


def complete(url: str, prompt: list[int], max_tokens: int = 8) -> list[int]:
    r = httpx.post(
        f"{url}/v1/completions",
        timeout=60,
        json={
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    assert r.status_code == 200, r.text
    return list(r.json()["choices"][0]["token_ids"])


@pytest.fixture(scope="module")
def expected(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    """Greedy completions through the local launcher."""
    with LocalCluster(spec(tiny_ckpt, tmp_path_factory.mktemp("local"))) as c:
        return [complete(c.http_url, p) for p in prompts()]


@pytest.fixture(scope="module")
def ray_nodes() -> Iterator[str]:
    """A head and two worker nodes, one CPU and a 100 MB object store each; yields the address."""
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 100 * MB}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def on_ray(ray_nodes: str, tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    cluster = RayCluster(spec(tiny_ckpt, tmp_path_factory.mktemp("ray")), ray_nodes, OPTIONS)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def address(cluster: RayCluster, name: str) -> str | None:
    return {w["worker_id"]: w["address"] for w in cluster.workers()}.get(name)


def wait_restarted(
    cluster: RayCluster, name: str, old_pid: object, old_address: str | None, timeout_s: float = 90.0
) -> None:
    """Until `name` runs a new process (a restarted actor) registered with the router at a new address."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = ray.get(cluster.proc(name).actor.info.remote(), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.2)  # being restarted
            continue
        if info["pid"] != old_pid and address(cluster, name) not in (None, old_address):
            assert info["restarted"]
            return
        time.sleep(0.2)
    raise AssertionError(f"{name} was not restarted and registered within {timeout_s} s")


def serves(cluster: RayCluster, expected: list[list[int]], timeout_s: float = 30.0) -> list[list[int]]:
    """The completions, once the cluster answers again (a request may meet a worker not yet dropped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return [complete(cluster.http_url, p) for p in prompts()]
        except (AssertionError, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_same_tokens_as_local_launcher_and_groups_spread(
    expected: list[list[int]], on_ray: RayCluster
) -> None:
    assert [complete(on_ray.http_url, p) for p in prompts()] == expected
    nodes = {i["name"]: i["node_id"] for i in on_ray.info()}
    assert nodes["prefill-0"] != nodes["decode-0"]  # one group per node while nodes last
    assert {w["worker_id"] for w in on_ray.workers()} == {"prefill-0", "decode-0"}


def test_killed_worker_actor_is_restarted_and_serves(expected: list[list[int]], on_ray: RayCluster) -> None:
    p = on_ray.proc("decode-0")
    old, old_address = ray.get(p.actor.info.remote()), address(on_ray, "decode-0")
    ray.kill(p.actor, no_restart=False)  # the actor dies; its process follows (PR_SET_PDEATHSIG)
    wait_restarted(on_ray, "decode-0", old["pid"], old_address)
    assert serves(on_ray, expected) == expected


def test_killed_worker_process_restarts_its_actor(expected: list[list[int]], on_ray: RayCluster) -> None:
    p = on_ray.proc("prefill-0")
    old, old_address = ray.get(p.actor.info.remote()), address(on_ray, "prefill-0")
    os.kill(int(old["pid"]), signal.SIGKILL)  # the process dies; its actor follows, Ray restarts it
    wait_restarted(on_ray, "prefill-0", old["pid"], old_address)
    assert serves(on_ray, expected) == expected
