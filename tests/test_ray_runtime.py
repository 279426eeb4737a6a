"""`k2serve up --ray` on a multi-node Ray cluster simulated on this machine (ray.cluster_utils): the
same tokens as the local launcher, worker groups spread over nodes, a killed worker actor (or its
process) restarted by Ray, registered again and serving, and a cluster over mutual TLS."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import ray
import torch
from conftest import local_cluster_spec

from k2serve.cluster.local import ClusterSpec, LocalCluster
from k2serve.cluster.ray_plan import RayOptions
from k2serve.cluster.ray_runtime import RayCluster, RayRuntimeError
from k2serve.rpc.tls import TLSFiles

if TYPE_CHECKING:
    from conftest import PKI  # the `pki` fixture's certificates

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MB = 1024 * 1024
ENGINE_ARGS = ("--kv-cache-mb", "16", "--block-size", "8", "--max-num-batched-tokens", "256")
ENV = {"OMP_NUM_THREADS": "1"}  # same torch threading under both launchers (Ray sets it for actors)
OPTIONS = RayOptions(rank_resources={"CPU": 0.5}, router_resources={"CPU": 0.25}, max_restarts=2)


def spec(ckpt: Path, workdir: Path, tls: TLSFiles | None = None) -> ClusterSpec:
    return local_cluster_spec(
        ckpt,
        workdir,
        engine_args=ENGINE_ARGS,
        heartbeat_timeout_s=3.0,
        startup_timeout_s=120.0,
        env=ENV,
        tls=tls,
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
    """A head and two worker nodes, 3 logical CPUs (the machine's 2 cores shared) and a 100 MB object
    store each; yields the address."""
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 3, "object_store_memory": 100 * MB}
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


def test_up_ray_cli_with_ep_groups_packed_same_tokens(
    expected: list[list[int]], on_ray: RayCluster, tiny_ckpt: Path, tmp_path: Path
) -> None:
    """`k2serve up --ray ADDRESS --ep 2` (default options: 1 CPU per rank, embedded Redis): every EP
    group's two ranks on one node, the local launcher's tokens, a killed rank's group restarted whole,
    and a clean stop on SIGINT."""
    flags = ["up", "--model", str(tiny_ckpt), "--ray", on_ray.address, "--ep", "2", "--port", "0"]
    flags += ["--grpc-port", "0", "--kv-cache-mb", "16", "--block-size", "8", "--workdir", str(tmp_path)]
    flags += ["--max-num-batched-tokens", "256"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "k2serve", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 150
        while not (ready := [x for x in lines if x.startswith("ready: OpenAI API ")]):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        url = ready[0].split()[3].removesuffix("/v1")
        ids = {w["worker_id"] for w in httpx.get(f"{url}/cluster/workers").json()["workers"]}
        assert ids == {f"{g}-ep{r}" for g in ("prefill-0", "decode-0") for r in (0, 1)}
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        actor = {w: next(n for n in names if n.endswith(f"-{w}") and on_ray.run_id not in n) for w in ids}
        node = {
            w: ray.get(ray.get_actor(n, namespace="k2serve").info.remote())["node_id"]
            for w, n in actor.items()
        }
        assert node["prefill-0-ep0"] == node["prefill-0-ep1"] and node["decode-0-ep0"] == node["decode-0-ep1"]
        assert [complete(url, p) for p in prompts()] == expected
        # A rank lost takes its group down (the other rank exits non-zero); Ray restarts both actors,
        # the group meets again at the same rendezvous and both ranks register again.
        decode = {r: ray.get_actor(actor[f"decode-0-ep{r}"], namespace="k2serve") for r in (0, 1)}
        old = {r: ray.get(a.info.remote())["pid"] for r, a in decode.items()}
        ray.kill(decode[1], no_restart=False)
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pids = {r: ray.get(a.info.remote(), timeout=5)["pid"] for r, a in decode.items()}
                workers = httpx.get(f"{url}/cluster/workers").json()["workers"]
                if all(pids[r] != old[r] for r in old) and len(workers) == 4:
                    break
            assert time.monotonic() < deadline, "the decode group did not come back"
            time.sleep(0.5)
        assert [complete(url, p) for p in prompts()] == expected
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=90)
        reader.join(timeout=5)
    assert code == 0 and lines[-1].strip() == "stopped.", "".join(lines[-30:])


def test_a_process_that_cannot_start_is_named_with_its_log(on_ray: RayCluster, tmp_path: Path) -> None:
    bad = spec(tmp_path / "no-such-checkpoint", tmp_path)
    with pytest.raises(RayRuntimeError, match=r"router exited with \d+") as e:
        RayCluster(bad, on_ray.address, OPTIONS).start()
    assert "no-such-checkpoint" in str(e.value)  # the end of its log


def test_a_group_that_fits_no_node_is_named(on_ray: RayCluster, tiny_ckpt: Path, tmp_path: Path) -> None:
    two_ranks = dataclasses.replace(spec(tiny_ckpt, tmp_path), ep_size=2)  # 4 CPUs on one 3-CPU node
    options = dataclasses.replace(OPTIONS, rank_resources={"CPU": 2.0}, placement_timeout_s=3.0)
    with pytest.raises(RayRuntimeError, match=r"not placed within 3 s: prefill-0 \(STRICT_PACK"):
        RayCluster(two_ranks, on_ray.address, options).start()


def test_cluster_over_mutual_tls(
    expected: list[list[int]], on_ray: RayCluster, pki: PKI, tiny_ckpt: Path, tmp_path: Path
) -> None:
    """`--tls-*` under Ray: every process serves and dials over mutual TLS (one certificate for
    localhost, checked under --tls-server-name since processes dial their nodes' IPs) and the router
    serves HTTPS with the local launcher's tokens; a plaintext client gets nothing."""
    tls = TLSFiles(str(pki.cert), str(pki.key), str(pki.ca), server_name="localhost")
    with RayCluster(spec(tiny_ckpt, tmp_path, tls), on_ray.address, OPTIONS) as cluster:
        assert cluster.spec.transfer_backend == "grpc"  # "auto" under TLS
        assert cluster.http_url.startswith("https://")
        assert {w["worker_id"] for w in cluster.workers()} == {"prefill-0", "decode-0"}
        body = {"max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        sni = {"sni_hostname": "localhost"}
        with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca)), timeout=60) as client:
            for p, want in zip(prompts()[:2], expected[:2], strict=True):
                url = f"{cluster.http_url}/v1/completions"
                r = client.post(url, json={"prompt": p, **body}, extensions=sni)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["token_ids"] == want
        plain = cluster.http_url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{plain}/cluster/workers", timeout=5)
