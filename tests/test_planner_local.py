"""The planner driving a real LocalCluster (tiny model): observations scraped from the live router,
decisions applied through the local connector, workers started and drained as processes."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import local_cluster_spec

from k2serve.cluster.local import LocalCluster
from k2serve.planner.config import PlannerConfig, RoleLimits
from k2serve.planner.connector import apply
from k2serve.planner.local import LocalConnector
from k2serve.planner.policy import Planner
from k2serve.planner.scrape import RouterScraper

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = local_cluster_spec(
        tiny_ckpt, tmp_path_factory.mktemp("planner-up"), num_decode=2, heartbeat_timeout_s=3.0
    )
    with LocalCluster(spec) as c:
        yield c


def _complete(url: str, model: str, max_tokens: int, timeout: float) -> dict[str, Any]:
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": [1, 2, 3, 4, 5], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
        timeout=timeout,
    )  # fmt: skip
    r.raise_for_status()
    return r.json()


def _ids(cluster: LocalCluster) -> list[str]:
    return sorted(w["worker_id"] for w in cluster.workers())


class DrainBroken(AssertionError):
    """A request on a worker that was scaled down did not finish."""


def test_scale_down_drains_the_in_flight_request(cluster: LocalCluster, tiny_ckpt: Path) -> None:
    conn = LocalConnector(cluster, drain_timeout_s=20)
    assert conn.replicas("decode") == 2
    results: dict[int, Any] = {}

    def send(i: int) -> None:
        try:
            results[i] = _complete(cluster.http_url, tiny_ckpt.name, 200, timeout=10)
        except httpx.HTTPError as e:
            results[i] = e

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while {w["worker_id"]: w["in_flight"] for w in cluster.workers()}.get("decode-1", 0) < 1:
        assert time.monotonic() < deadline, "the second request never reached decode-1"
        time.sleep(0.05)
    conn.scale("decode", 1)  # SIGTERM decode-1 while it generates
    conn.wait_settled(30)
    for t in threads:
        t.join()
    assert _ids(cluster) == ["decode-0", "prefill-0"]
    bad = {
        i: r
        for i, r in results.items()
        if not (isinstance(r, dict) and r["choices"][0]["finish_reason"] == "length")
    }
    if bad:
        raise DrainBroken(f"requests cut by the scale-down: {bad}")


def test_planner_decisions_scale_the_cluster_up_and_down(cluster: LocalCluster, tiny_ckpt: Path) -> None:
    conn = LocalConnector(cluster, drain_timeout_s=20)
    # Whatever the previous test left, settle on one decode worker (a direct connector action).
    conn.scale("decode", 1)
    conn.wait_settled(30)
    scraper = RouterScraper(cluster.http_url, conn.replicas, quantile=0.9)
    # A minimum of two decode workers: the planner scales up from the live observation.
    cfg = PlannerConfig(
        ttft_slo_s=60.0,  # generous SLOs: a loaded CI machine must still count as idle
        itl_slo_s=10.0,
        down_after=1,
        down_cooldown_s=0.0,
        decode=RoleLimits(min_replicas=2, max_replicas=3),
    )
    planner = Planner(cfg)
    obs = scraper.observe()
    assert (obs.prefill.ready, obs.decode.ready, obs.decode.replicas) == (1, 1, 1)
    d = planner.decide(obs, 0.0)
    assert (d.decode.current, d.decode.target) == (1, 2) and "below the minimum" in d.decode.reason
    t = time.monotonic()
    assert apply(d, conn) == [("decode", 1, 2)]
    conn.wait_settled(120)
    startup_s = time.monotonic() - t
    assert _ids(cluster) == ["decode-0", "decode-1", "prefill-0"]
    out = _complete(cluster.http_url, tiny_ckpt.name, 8, timeout=60)
    assert out["choices"][0]["finish_reason"] == "length"
    # The same planner with a minimum of one: the cluster is idle, so decode goes down by one.
    planner.config = dataclasses.replace(cfg, decode=RoleLimits(min_replicas=1, max_replicas=3))
    obs = scraper.observe()
    assert obs.decode.replicas == 2 and obs.decode.ready == 2 and obs.ttft_s is not None
    d = planner.decide(obs, 10.0)
    assert (d.decode.current, d.decode.target) == (2, 1) and "idle" in d.decode.reason
    assert not d.prefill.changed  # already at its minimum of one
    drained = next(p for p in cluster.procs if p.name == "decode-1")
    apply(d, conn)
    assert conn.replicas("decode") == 1  # at once, while decode-1 drains
    conn.wait_settled(30)
    assert drained.popen.returncode == 0  # it exited on SIGTERM, not by the connector's SIGKILL
    assert drained not in cluster.procs
    assert _ids(cluster) == ["decode-0", "prefill-0"]
    print(f"decode worker: scale-up to registered in {startup_s:.1f} s")
