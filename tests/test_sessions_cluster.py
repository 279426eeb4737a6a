"""Agent sessions through the cluster: Redis-backed sessions, session-aware routing, conditional
disaggregation (the holder computes the turn's new tokens itself) and recovery when the holder dies."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from conftest import local_cluster_spec

from k2serve.chat.prompt import PromptEncoder
from k2serve.chat.tokenizer import load_tokenizer
from k2serve.cluster.local import LocalCluster
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm import LLM
from k2serve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow
KEY_A, KEY_B = "key-alice", "key-bob"


@pytest.fixture(scope="module")
def cluster(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = local_cluster_spec(
        tiny_ckpt,
        tmp_path_factory.mktemp("up"),
        num_decode=2,
        use_redis=True,
        api_key=f"{KEY_A},{KEY_B}",
        heartbeat_timeout_s=3.0,
    )
    with LocalCluster(spec) as c:
        yield c


def client(cluster: LocalCluster, key: str) -> httpx.Client:
    return httpx.Client(base_url=cluster.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def chat(c: httpx.Client, sid: str, text: str) -> dict:
    r = c.post(
        "/v1/chat/completions",
        json={
            "session_id": sid,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()


def expected_reply(ckpt: Path, messages: list[dict]) -> str:
    tok = load_tokenizer(ckpt)
    prompt = PromptEncoder(tok).encode_chat(messages, None, tok.chat_template)
    llm = LLM(ckpt, engine_config=EngineConfig(num_kv_blocks=512, block_size=8))
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8))[0]
    return out.text


def test_embedded_redis_password_stays_off_command_lines(cluster: LocalCluster) -> None:
    """`up`'s own Redis listens on 127.0.0.1 and wants the password generated for this cluster, which
    reaches the router by file: no process's command line or environment holds it."""
    assert cluster.redis is not None and cluster.redis_connection is not None
    assert cluster.redis_connection.url == f"redis://127.0.0.1:{cluster.redis.port}/0"
    password = cluster.redis_connection.password()
    assert password
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=cluster.redis.port, socket_timeout=5).ping()
    assert cluster.redis.client().config_get("bind") == {"bind": "127.0.0.1"}
    for pid in [cluster.redis.pid, *(p.popen.pid for p in cluster.procs)]:
        for part in ("cmdline", "environ"):
            assert password.encode() not in Path(f"/proc/{pid}/{part}").read_bytes(), (pid, part)
    router = next(p for p in cluster.procs if p.name == "router")
    cmdline = Path(f"/proc/{router.popen.pid}/cmdline").read_bytes().split(b"\0")
    assert (
        cmdline[cmdline.index(b"--redis-password-file") + 1]
        == str(cluster.dir / "redis" / "password").encode()
    )


def test_session_crud_and_owner_isolation(cluster: LocalCluster) -> None:
    a, b = client(cluster, KEY_A), client(cluster, KEY_B)
    r = a.post("/v1/sessions", json={"messages": [{"role": "system", "content": "You are terse."}]})
    assert r.status_code == 200, r.text
    sid = r.json()["id"]
    assert r.json()["num_messages"] == 1
    assert a.get(f"/v1/sessions/{sid}").status_code == 200
    other = b.get(f"/v1/sessions/{sid}")
    assert other.status_code == 404 and other.json()["error"]["code"] == "session_not_found"
    assert b.get("/v1/sessions/definitely-not-a-session").status_code in (400, 404)
    assert a.get("/v1/sessions/bad%20id!").status_code == 400
    r = a.post(f"/v1/sessions/{sid}/messages", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["turn_count"] == 1
    assert b.delete(f"/v1/sessions/{sid}").status_code == 404
    assert a.delete(f"/v1/sessions/{sid}").status_code == 200
    assert a.get(f"/v1/sessions/{sid}").status_code == 404


def test_turns_reuse_the_holder_and_survive_its_death(cluster: LocalCluster, tiny_ckpt: Path) -> None:
    a = client(cluster, KEY_A)
    system = {"role": "system", "content": "You are a helpful agent. " * 12}
    sid = a.post("/v1/sessions", json={"messages": [system]}).json()["id"]
    r1 = chat(a, sid, "first question")
    reply1 = r1["choices"][0]["message"]
    assert reply1["content"] == expected_reply(
        tiny_ckpt, [system, {"role": "user", "content": "first question"}]
    )
    s = a.get(f"/v1/sessions/{sid}").json()
    holder = s["holder"]["worker_id"]
    assert holder.startswith("decode") and s["holder"]["cached_tokens"] > 0 and s["num_messages"] == 3

    auth = {"authorization": f"Bearer {KEY_A}"}  # the operators' view needs a key too
    before = httpx.get(f"{cluster.http_url}/cluster/workers", headers=auth).json()["local_prefills"]
    r2 = chat(a, sid, "second question")
    after = httpx.get(f"{cluster.http_url}/cluster/workers", headers=auth).json()["local_prefills"]
    assert after == before + 1  # served by the holder itself: no prefill worker, no KV transfer
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # its prefix cache was hit
    history = [
        system,
        {"role": "user", "content": "first question"},
        {k: v for k, v in reply1.items() if v is not None},
        {"role": "user", "content": "second question"},
    ]
    assert r2["choices"][0]["message"]["content"] == expected_reply(tiny_ckpt, history)
    assert a.get(f"/v1/sessions/{sid}").json()["holder"]["worker_id"] == holder
    metrics = httpx.get(f"{cluster.http_url}/metrics").text  # sessions' KV, in blocks
    held = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("k2serve_session_kv_blocks ")
    ]
    assert held and held[0] >= a.get(f"/v1/sessions/{sid}").json()["kv_blocks"] > 0

    cluster.kill(holder)
    t0 = time.monotonic()
    r3 = chat(a, sid, "third question")  # rebuilt from Redis, re-prefilled on the other decode worker
    assert r3["choices"][0]["finish_reason"] in ("stop", "length")
    s = a.get(f"/v1/sessions/{sid}").json()
    assert s["num_messages"] == 7 and s["turn_count"] == 3
    assert s["holder"]["worker_id"] != holder
    assert time.monotonic() - t0 < 30
