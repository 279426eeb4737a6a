"""Soak (bounded in time): rounds of many concurrent streaming sessions through the cluster; the memory
of every process stays flat once warm and no KV block is leaked."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from conftest import local_cluster_spec

from k2serve.cluster.local import LocalCluster

pytestmark = pytest.mark.slow
ROUNDS, CONCURRENT = 6, 16


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def session_round(url: str, r: int) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(i: int) -> int:
            body = {
                "messages": [{"role": "user", "content": f"round {r} stream {i} " * (1 + i % 5)}],
                "max_tokens": 12,
                "temperature": 0.7,
                "seed": i,
                "stream": True,
            }
            n = 0
            async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    n += line.startswith("data: ")
            return n

        return sum(await asyncio.gather(*(one(i) for i in range(CONCURRENT))))


def test_memory_is_flat_under_repeated_load(tiny_ckpt: Path, tmp_path: Path) -> None:
    spec = local_cluster_spec(tiny_ckpt, tmp_path)
    deadline = time.monotonic() + 240
    with LocalCluster(spec) as c:
        samples: list[dict[str, float]] = []
        for r in range(ROUNDS):
            assert time.monotonic() < deadline, "soak exceeded its time bound"
            assert asyncio.run(session_round(c.http_url, r)) > CONCURRENT  # chunks streamed
            samples.append({p.name: rss_mb(p.popen.pid) for p in c.procs})
        warm, last = samples[1], samples[-1]
        for name in warm:
            assert last[name] - warm[name] < 64, f"{name} grew {last[name] - warm[name]:.0f} MiB: {samples}"
        end = time.monotonic() + 10
        while time.monotonic() < end:
            dec = [w for w in c.workers() if w["role"] == "decode"][0]
            if dec["total_blocks"] and dec["free_blocks"] == dec["total_blocks"]:
                break
            time.sleep(0.3)
        assert dec["free_blocks"] == dec["total_blocks"]
