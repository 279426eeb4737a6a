"""The agent loop through a real cluster (router + 1 prefill + 1 decode, Redis sessions): 300 tool steps
in one session each prefilling only their new tokens on the holder, the gRPC transport, resume over
gRPC (the history it reads is HTTP's), and resume in this process after the agent's own process was
SIGKILLed mid-loop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
import torch
from conftest import local_cluster_spec

from k2serve.agent import AgentLoop, GRPCTransport, HTTPTransport, ToolRegistry, TransportError
from k2serve.cluster.local import LocalCluster
from k2serve.model.checkpoint import write_checkpoint
from k2serve.model.presets import PRESETS

pytestmark = pytest.mark.slow
KEY, OTHER_KEY = "agent-key", "other-key"
BLOCK = 8
Digit = Annotated[int, {"minimum": 0, "maximum": 9}]  # short arguments: a step stays ~50 tokens
OPTIONS: dict[str, Any] = {"tool_choice": "required", "max_tokens": 64, "temperature": 0}

# The child process of the resume test: an agent that would run for 1000 steps.
CHILD = """
import sys
from typing import Annotated
from k2serve.agent import AgentLoop, HTTPTransport, ToolRegistry
tools = ToolRegistry()
@tools.register
def add(a: Annotated[int, {"minimum": 0, "maximum": 9}], b: Annotated[int, {"minimum": 0, "maximum": 9}]) -> int:
    return a + b
transport = HTTPTransport.connect(sys.argv[1], sys.argv[2])
sid = transport.create_session([{"role": "system", "content": "You add numbers."}], None, None)
print(sid, flush=True)
AgentLoop(transport, tools, session_id=sid, max_steps=1000, tool_choice="required", max_tokens=64,
          temperature=0).run("Add 2 and 3, then keep adding.")
"""


def adder() -> ToolRegistry:
    tools = ToolRegistry()

    @tools.register
    def add(a: Digit, b: Digit) -> int:
        """Add two digits."""
        return a + b

    return tools


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny` with a 32k context: 300 tool steps are ~14k tokens, past tiny's 8192 positions."""
    cfg = PRESETS["tiny"] | {"max_position_embeddings": 32768}
    cfg["rope_scaling"] = {**cfg["rope_scaling"], "factor": 16.0}
    return write_checkpoint(tmp_path_factory.mktemp("tiny32k"), cfg, seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def cluster(long_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = local_cluster_spec(
        long_ckpt,
        tmp_path_factory.mktemp("agent-cluster"),
        use_redis=True,
        engine_args=("--kv-cache-mb", "32", "--block-size", str(BLOCK)),
        api_key=f"{KEY},{OTHER_KEY}",
    )
    with LocalCluster(spec) as c:
        yield c


def router_counters(cluster: LocalCluster) -> tuple[int, int]:
    view = httpx.get(
        f"{cluster.http_url}/cluster/workers", headers={"authorization": f"Bearer {KEY}"}, timeout=10
    ).json()
    return view["local_prefills"], view["kv_bytes_transferred"]


def check_well_formed(messages: list[dict[str, Any]]) -> None:
    """Every assistant tool call is answered by one tool message, in order, before the next reply."""
    i = 0
    while i < len(messages):
        calls = messages[i].get("tool_calls") or []
        if messages[i]["role"] == "assistant" and calls and i + 1 < len(messages):
            results = messages[i + 1 : i + 1 + len(calls)]
            assert [m["role"] for m in results] == ["tool"] * len(calls), i
            assert [m["tool_call_id"] for m in results] == [c["id"] for c in calls], i
            i += len(calls)
        i += 1


def test_300_tool_steps_prefill_only_their_new_tokens(cluster: LocalCluster) -> None:
    transport = HTTPTransport.connect(cluster.http_url, KEY)
    local_before, bytes_before = router_counters(cluster)
    loop = AgentLoop(transport, adder(), max_steps=300, system_prompt="You add numbers.", **OPTIONS)
    t0 = time.monotonic()
    result = loop.run("Add 2 and 3, then keep adding.")
    elapsed = time.monotonic() - t0
    steps = result.steps
    assert result.stop_reason == "max_steps" and len(steps) == 300

    # Bound on the tokens each turn computed. The holder caches the previous turn's prompt in full
    # blocks, and nothing after it: the template re-renders the previous reply with an empty
    # <think></think> the model never generated, so the reply's own KV is not reusable. So a turn
    # computes at most (its prompt - the previous prompt) new tokens plus the previous prompt's last,
    # partial block: < added + BLOCK. Every turn after the first also went to the holder directly
    # (local_prefills), so no KV crossed the network after the first turn.
    for prev, cur in zip(steps, steps[1:], strict=False):
        added = cur.prompt_tokens - prev.prompt_tokens
        assert 0 < cur.computed_tokens < added + BLOCK, (cur.index, cur.computed_tokens, added)
    assert steps[-1].prompt_tokens > 10_000 and steps[-1].computed_tokens < 0.01 * steps[-1].prompt_tokens
    local_after, bytes_after = router_counters(cluster)
    assert local_after - local_before == 299
    assert bytes_after > bytes_before  # the first turn's prompt went prefill worker -> decode worker

    # Every tool call the model finished ran and answered right.
    ran = [c for s in steps for c in s.tool_calls]
    assert len(ran) >= 299
    for s in steps[:-1]:
        if s.finish_reason == "tool_calls":
            for c in s.tool_calls:
                args = json.loads(c.arguments)
                assert c.error is None and c.content == str(args["a"] + args["b"])

    # The session holds exactly what the loop sent and received.
    history = transport.session_messages(result.session_id)
    assert history == [{"role": "system", "content": "You add numbers."}, *result.messages]
    check_well_formed(history)
    early, late = (sum(s.latency_s for s in part) / len(part) for part in (steps[1:31], steps[-30:]))
    print(
        f"\n300 steps in {elapsed:.1f} s; turn latency {early * 1e3:.0f} ms (steps 1-30) -> "
        f"{late * 1e3:.0f} ms (last 30); last prompt {steps[-1].prompt_tokens} tokens, computed "
        f"{steps[-1].computed_tokens}; {sum(s.finish_reason == 'length' for s in steps)} turns cut by max_tokens"
    )
    assert transport.delete_session(result.session_id)


def test_grpc_transport_keeps_the_session_on_its_holder(cluster: LocalCluster) -> None:
    transport = GRPCTransport.connect(f"127.0.0.1:{cluster.grpc_port}", KEY)
    local_before, _ = router_counters(cluster)
    result = AgentLoop(transport, adder(), max_steps=6, system_prompt="You add digits.", **OPTIONS).run("go")
    assert result.stop_reason == "max_steps" and len(result.steps) == 6
    for prev, cur in zip(result.steps, result.steps[1:], strict=False):
        assert cur.computed_tokens < cur.prompt_tokens - prev.prompt_tokens + BLOCK
    assert router_counters(cluster)[0] - local_before == 5
    history = HTTPTransport.connect(cluster.http_url, KEY).session_messages(result.session_id)
    assert history == [{"role": "system", "content": "You add digits."}, *result.messages]
    with pytest.raises(TransportError) as e:  # another key's session does not exist for this one
        HTTPTransport.connect(cluster.http_url, OTHER_KEY).session_messages(result.session_id)
    assert e.value.status == 404
    assert transport.delete_session(result.session_id) and not transport.delete_session(result.session_id)


def test_resume_over_grpc(cluster: LocalCluster) -> None:
    target = f"127.0.0.1:{cluster.grpc_port}"
    grpc_t, http_t = GRPCTransport.connect(target, KEY), HTTPTransport.connect(cluster.http_url, KEY)
    first = AgentLoop(grpc_t, adder(), max_steps=2, system_prompt="You add digits.", **OPTIONS).run("go")
    assert first.stop_reason == "max_steps" and first.pending_tool_calls
    sid = first.session_id
    before = grpc_t.session_messages(sid)
    assert before == http_t.session_messages(sid)  # GetSessionMessages returns what HTTP returns
    assert before == [{"role": "system", "content": "You add digits."}, *first.messages]
    with pytest.raises(TransportError) as e:  # another key's session does not exist for this one
        GRPCTransport.connect(target, OTHER_KEY).session_messages(sid)
    assert e.value.status == "NOT_FOUND"

    result = AgentLoop.resume(sid, GRPCTransport.connect(target, KEY), adder(), max_steps=2, **OPTIONS)
    assert [r.id for r in result.resumed_tool_calls] == [c["id"] for c in first.pending_tool_calls]
    after = grpc_t.session_messages(sid)
    assert after == http_t.session_messages(sid) == [*before, *result.messages]  # nothing lost, nothing twice
    assert after[len(before)]["role"] == "tool" and len(result.steps) == 2
    check_well_formed(after)
    assert grpc_t.delete_session(sid)


def test_resume_after_the_agent_process_is_killed(cluster: LocalCluster, tmp_path: Path) -> None:
    http = httpx.Client(base_url=cluster.http_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), cluster.http_url, KEY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        sid = child.stdout.readline().strip()
        assert sid.startswith("sess_"), child.stderr.read() if child.stderr else ""
        deadline = time.monotonic() + 120
        while http.get(f"/v1/sessions/{sid}").json()["tool_step_count"] < 5:
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    # The server cancels the dead client's turn when it sees the disconnect; resume once it has settled.
    count, still_since = -1, time.monotonic()
    while time.monotonic() - still_since < 1.5:
        n = http.get(f"/v1/sessions/{sid}").json()["num_messages"]
        count, still_since = n, still_since if n == count else time.monotonic()
        time.sleep(0.1)
    before = HTTPTransport.connect(cluster.http_url, KEY).session_messages(sid)
    assert before[-1]["role"] == "assistant" and before[-1]["tool_calls"]  # killed between turns' records

    result = AgentLoop.resume(
        sid, HTTPTransport.connect(cluster.http_url, KEY), adder(), max_steps=3, **OPTIONS
    )
    assert [r.id for r in result.resumed_tool_calls] == [c["id"] for c in before[-1]["tool_calls"]]
    after = HTTPTransport.connect(cluster.http_url, KEY).session_messages(sid)
    assert after == [*before, *result.messages]  # nothing lost, nothing twice
    assert after[len(before)]["role"] == "tool" and len(result.steps) == 3
    check_well_formed(after)
    assert result.steps[0].cached_tokens > 0  # the resumed turn still found its prefix on the holder
