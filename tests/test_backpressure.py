"""Early rejection under overload: with a predicted-TTFT limit, a flood far above the sustainable rate
gets 429 + Retry-After for the excess at once (before any work), every accepted request completes, and
the router's memory stays bounded. (The limit, 2 s, lies between one prompt's prefill time and the flood's
backlog for any prefill rate from about 1K to 40K tokens/s, so the test holds on slow and fast machines.)"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import pytest
import torch
from conftest import local_cluster_spec

from k2serve.cluster.local import LocalCluster

pytestmark = pytest.mark.slow


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_flood_is_shed_early(tiny_ckpt: Path, tmp_path: Path) -> None:
    spec = local_cluster_spec(
        tiny_ckpt,
        tmp_path,
        engine_args=("--kv-cache-mb", "256", "--block-size", "8"),
        router_args=("--max-ttft-ms", "2000"),
    )
    g = torch.Generator().manual_seed(0)
    with LocalCluster(spec) as c:
        warm = httpx.post(
            f"{c.http_url}/v1/completions",
            timeout=60,
            json={"prompt": torch.randint(0, 1024, (800,), generator=g).tolist(), "max_tokens": 1},
        )
        assert warm.status_code == 200  # the router has now measured the prefill rate
        router_pid = c.procs[0].popen.pid
        before = rss_mb(router_pid)

        def one(_: int) -> httpx.Response:
            prompt = torch.randint(0, 1024, (2000,)).tolist()
            return httpx.post(
                f"{c.http_url}/v1/completions",
                timeout=120,
                json={"prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True},
            )

        with concurrent.futures.ThreadPoolExecutor(48) as pool:
            results = list(pool.map(one, range(96)))
        codes = [r.status_code for r in results]
        assert set(codes) <= {200, 429}, codes
        rejected = [r for r in results if r.status_code == 429]
        assert rejected and codes.count(200) >= 1
        assert all(int(r.headers["retry-after"]) >= 1 for r in rejected)
        assert rejected[0].json()["error"]["type"]
        stats = httpx.get(f"{c.http_url}/cluster/workers").json()
        assert stats["rejected_early"] == len(rejected)
        metrics = httpx.get(f"{c.http_url}/metrics").text  # the same count, by reason, for Prometheus
        assert (
            f'k2serve_admission_rejections_total{{model_name="{tiny_ckpt.name}",reason="predicted_ttft"}} {float(len(rejected))}'
            in metrics
        )
        assert rss_mb(router_pid) - before < 200  # bounded: the excess was never queued
