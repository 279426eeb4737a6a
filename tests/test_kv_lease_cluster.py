"""Session leases in the cluster (issue 18 item 4): a real local cluster whose prefill worker's pool is
small enough that two other requests evict a paused conversation's blocks. A whole-history conversation
(no session id) gets a router lease key once its prompt matches a live prefix; with
`--kv-session-lease-s` the prefill worker keeps the paused turn's blocks, so the next turn hits them;
without, it finds nothing. The lease shows in the worker's `k2serve_kv_leased_blocks` and in
`/cluster/workers`."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from conftest import local_cluster_spec

from k2serve.cluster.local import LocalCluster

pytestmark = pytest.mark.slow

BS = 8
MAX_TOKENS = 3


def _tokens(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + 31 * k) % 997 + 1 for k in range(n)]


def _complete(client: httpx.Client, prompt: list[int], max_tokens: int = MAX_TOKENS) -> tuple[list[int], int]:
    r = client.post(
        "/v1/completions",
        json={
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    return list(body["choices"][0]["token_ids"]), body["usage"]["prompt_tokens_details"]["cached_tokens"]


def _prefill_view(cluster: LocalCluster) -> dict:
    (w,) = [w for w in cluster.workers() if w["role"] == "prefill"]
    return w


def _wait_leased(cluster: LocalCluster, timeout_s: float = 10.0) -> int:
    """The prefill worker's leased blocks once its heartbeat reports some (0 after the timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leased = int(_prefill_view(cluster)["leased_blocks"])
        if leased:
            return leased
        time.sleep(0.1)
    return 0


def _scenario(tiny_ckpt: Path, workdir: Path, lease_s: int) -> dict[str, int]:
    """Turn 1, turn 2 (matches turn 1: a lease key), a pause in which two unrelated requests fill the
    pool, turn 3. Returns the cached tokens of turns 2 and 3, the leased blocks seen, and more."""
    engine_args = ("--kv-cache-mb", "1", "--block-size", str(BS), "--heartbeat-interval", "0.3")
    if lease_s:
        engine_args += ("--kv-session-lease-s", str(lease_s))
    spec = local_cluster_spec(tiny_ckpt, workdir, engine_args=engine_args)
    out: dict[str, int] = {}
    with LocalCluster(spec) as cluster, httpx.Client(base_url=cluster.http_url, timeout=120) as client:
        total = int(_prefill_view(cluster)["total_blocks"])
        turn1 = _tokens(1, 100)
        reply, _ = _complete(client, turn1)
        turn2 = turn1 + reply + _tokens(2, 60)
        reply, out["turn2_cached"] = _complete(client, turn2)
        session_blocks = len(turn2) // BS
        out["session_blocks"] = session_blocks
        out["leased"] = _wait_leased(cluster, 10.0 if lease_s else 1.0)
        if lease_s:
            metrics_url = _prefill_view(cluster)["metrics_url"]
            text = httpx.get(metrics_url, timeout=10).text
            m = re.search(r"^k2serve_kv_leased_blocks\{[^}]*\} (\S+)$", text, re.MULTILINE)
            out["leased_metric"] = int(float(m.group(1))) if m else -1
        # Two requests of F blocks each: F fits beside the leased blocks, 2F exceeds the pool, so
        # without the lease the second evicts the (least recently used) conversation's blocks.
        filler = (total // 2 + (total - session_blocks)) // 2
        assert 2 * filler > total and filler + session_blocks + 4 < total
        for seed in (3, 4):
            _, cached = _complete(client, _tokens(seed * 100, filler * BS - 2), max_tokens=1)
            assert cached == 0
        turn3 = turn2 + reply + _tokens(5, 20)
        _, out["turn3_cached"] = _complete(client, turn3)
        out["expected"] = len(turn2) // BS * BS
    return out


def test_a_lease_keeps_a_paused_conversation_through_eviction(tiny_ckpt: Path, tmp_path: Path) -> None:
    leased = _scenario(tiny_ckpt, tmp_path / "lease", lease_s=60)
    plain = _scenario(tiny_ckpt, tmp_path / "plain", lease_s=0)
    for r in (leased, plain):
        assert r["turn2_cached"] == 100 // BS * BS  # turn 1's full blocks, before any eviction
    # with the lease: turn 2's blocks (the prompt's full blocks) were leased and survived the fillers
    assert leased["leased"] == leased["session_blocks"] == leased["leased_metric"]
    assert leased["turn3_cached"] == leased["expected"] > 0
    # without: nothing leased, and the fillers evicted the whole conversation
    assert plain["leased"] == 0
    assert plain["turn3_cached"] == 0
