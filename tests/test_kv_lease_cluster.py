"""Session leases in the cluster (issue 18 item 4): a real local cluster whose workers' pools are small
enough that two other requests evict a paused conversation's blocks. A whole-history conversation (no
session id) gets a router lease key once its prompt matches a live prefix; with `--kv-session-lease-s`
the prefill worker keeps the paused turn's blocks, so the next turn hits them; without, it finds
nothing. The same for a chat `session_id` turn, whose next turn its decode worker (the session's
holder) computes itself. The lease shows in the worker's `k2serve_kv_leased_blocks` and in
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


def _prefill_view(cluster: LocalCluster, role: str = "prefill") -> dict:
    (w,) = [w for w in cluster.workers() if w["role"] == role]
    return w


def _wait_leased(cluster: LocalCluster, timeout_s: float = 10.0, role: str = "prefill") -> int:
    """The `role` worker's leased blocks once its heartbeat reports some (0 after the timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leased = int(_prefill_view(cluster, role)["leased_blocks"])
        if leased:
            return leased
        time.sleep(0.1)
    return 0


def _engine_args(lease_s: int) -> tuple[str, ...]:
    args = ("--kv-cache-mb", "1", "--block-size", str(BS), "--heartbeat-interval", "0.3")
    return args + (("--kv-session-lease-s", str(lease_s)) if lease_s else ())


def _fill(client: httpx.Client, total: int, held: int) -> None:
    """Two unrelated requests of F blocks each: F fits beside `held` leased blocks, 2F exceeds the pool
    of `total` blocks, so without a lease the second evicts the (least recently used) held blocks.
    Two output tokens: the decode worker runs a step, so their blocks enter its prefix cache too."""
    filler = (total // 2 + (total - held)) // 2
    assert 2 * filler > total and filler + held + 4 < total
    for seed in (3, 4):
        _, cached = _complete(client, _tokens(seed * 100, filler * BS - 3), max_tokens=2)
        assert cached == 0


def _scenario(tiny_ckpt: Path, workdir: Path, lease_s: int) -> dict[str, int]:
    """Turn 1, turn 2 (matches turn 1: a lease key), a pause in which two unrelated requests fill the
    pool, turn 3. Returns the cached tokens of turns 2 and 3, the leased blocks seen, and more."""
    spec = local_cluster_spec(tiny_ckpt, workdir, engine_args=_engine_args(lease_s))
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
        _fill(client, total, session_blocks)
        turn3 = turn2 + reply + _tokens(5, 20)
        _, out["turn3_cached"] = _complete(client, turn3)
        out["expected"] = len(turn2) // BS * BS
        # the decode worker measured its decode steps and reports them on the heartbeat (TPOT routing)
        deadline = time.monotonic() + 10
        while not _prefill_view(cluster, "decode")["decode_step_ms"] and time.monotonic() < deadline:
            time.sleep(0.1)
        out["decode_step_ms"] = _prefill_view(cluster, "decode")["decode_step_ms"]
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
    assert leased["decode_step_ms"] > 0 and plain["decode_step_ms"] > 0


def _chat(client: httpx.Client, sid: str, text: str) -> dict:
    r = client.post(
        "/v1/chat/completions",
        json={
            "session_id": sid,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()


def _session_scenario(tiny_ckpt: Path, workdir: Path, lease_s: int) -> dict[str, int]:
    """A chat session's turn 1, a pause in which two unrelated requests fill the pools, turn 2 (which the
    session's holder, the decode worker, computes itself from its prefix cache)."""
    spec = local_cluster_spec(tiny_ckpt, workdir, engine_args=_engine_args(lease_s), use_redis=True)
    out: dict[str, int] = {}
    with LocalCluster(spec) as cluster, httpx.Client(base_url=cluster.http_url, timeout=120) as client:
        total = int(_prefill_view(cluster, "decode")["total_blocks"])
        system = {"role": "system", "content": "You are a helpful agent. " * 8}
        sid = client.post("/v1/sessions", json={"messages": [system]}).json()["id"]
        r1 = _chat(client, sid, "the first question, about the weather")
        out["turn1_prompt"] = r1["usage"]["prompt_tokens"]
        out["leased"] = _wait_leased(cluster, 10.0 if lease_s else 1.0, role="decode")
        _fill(client, total, (out["turn1_prompt"] + MAX_TOKENS) // BS + 1)
        r2 = _chat(client, sid, "and the second one")
        out["turn2_cached"] = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
    return out


def test_a_lease_keeps_a_paused_session_through_eviction(tiny_ckpt: Path, tmp_path: Path) -> None:
    leased = _session_scenario(tiny_ckpt, tmp_path / "lease", lease_s=60)
    plain = _session_scenario(tiny_ckpt, tmp_path / "plain", lease_s=0)
    assert leased["leased"] > 0 and plain["leased"] == 0
    # turn 1's prompt and reply, in full blocks, survived the fillers on the holder with the lease
    assert leased["turn2_cached"] >= leased["turn1_prompt"] // BS * BS > 0
    assert plain["turn2_cached"] == 0
