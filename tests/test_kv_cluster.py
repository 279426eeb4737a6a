"""KV-aware routing end to end: a real local cluster with two prefill workers. A multi-turn conversation
that resends its whole history without a session id lands every turn on the prefill worker holding its
prefix (the index learns it from the worker's KV events on the heartbeat), reuses it (usage's cached
tokens), and its greedy tokens equal the offline engine's; with `--routing-policy least-loaded` the same
turns spread over both workers and lose part of the reuse."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from conftest import local_cluster_spec

from k2serve.cluster.local import LocalCluster
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm import LLM
from k2serve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

BS = 8
# Workers heartbeat every 0.3 s, so a turn's KV events reach the router quickly.
ENGINE_ARGS = ("--kv-cache-mb", "32", "--block-size", str(BS), "--heartbeat-interval", "0.3")
TURNS = 4
MAX_TOKENS = 5


def _user_tokens(turn: int) -> list[int]:
    return [(37 * turn + 11 * k) % 1000 + 1 for k in range(9 + 3 * turn)]


def _index_blocks(cluster: LocalCluster) -> dict[str, int]:
    return {w["worker_id"]: w["kv_index_blocks"] for w in cluster.workers() if w["role"] == "prefill"}


def _wait_for_index(cluster: LocalCluster, blocks: int, timeout_s: float = 10.0) -> dict[str, int]:
    """Wait until some prefill worker's KV events placed `blocks` blocks in the router's index."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = _index_blocks(cluster)
        if max(seen.values()) >= blocks or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def _conversation(cluster: LocalCluster, model: str) -> list[tuple[list[int], list[int], int]]:
    """TURNS turns, each prompt the whole history (previous prompt + its answer + new user tokens):
    [(prompt, greedy output, usage's cached tokens)]."""
    turns: list[tuple[list[int], list[int], int]] = []
    prompt = _user_tokens(0)
    with httpx.Client(base_url=cluster.http_url, timeout=60) as client:
        for t in range(TURNS):
            r = client.post(
                "/v1/completions",
                json={
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                    "ignore_eos": True,
                    "return_token_ids": True,
                },
            )
            assert r.status_code == 200, r.text
            body = r.json()
            out = list(body["choices"][0]["token_ids"])
            turns.append((prompt, out, body["usage"]["prompt_tokens_details"]["cached_tokens"]))
            # a client's think time: the prefill worker's events reach the router's index
            _wait_for_index(cluster, len(prompt) // BS)
            prompt = prompt + out + _user_tokens(t + 1)
    return turns


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of the sample `name{labels...}` (labels a subset of the sample's), or 0.0 when absent."""
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return 0.0


def test_whole_history_turns_follow_their_prefix(tiny_ckpt: Path, tmp_path: Path) -> None:
    model = tiny_ckpt.name
    results = {}
    for policy in ("kv", "least-loaded"):
        spec = local_cluster_spec(
            tiny_ckpt,
            tmp_path / policy,
            num_prefill=2,
            engine_args=ENGINE_ARGS,
            router_args=("--routing-policy", policy),
        )
        with LocalCluster(spec) as cluster:
            turns = _conversation(cluster, model)
            blocks = _index_blocks(cluster)
            metrics = httpx.get(f"{cluster.http_url}/metrics", timeout=10).text
        results[policy] = (turns, blocks, metrics)

    # Greedy tokens equal the single-process engine's, turn by turn, under both policies.
    llm = LLM(tiny_ckpt, engine_config=EngineConfig(num_kv_blocks=1024, block_size=BS))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for turns, _, _ in results.values():
        expected = [o.token_ids for o in llm.generate([p for p, _, _ in turns], [params] * TURNS)]
        assert [out for _, out, _ in turns] == expected

    # kv: every turn on one prefill worker, each reusing the whole previous prompt's full blocks.
    turns, blocks, metrics = results["kv"]
    reuse = [len(turns[t - 1][0]) // BS * BS for t in range(1, TURNS)]
    assert [cached for _, _, cached in turns] == [0, *reuse]
    assert sorted(blocks.values())[0] == 0 and max(blocks.values()) >= len(turns[-1][0]) // BS
    assert _metric(
        metrics, "k2serve_router_routing_decisions_total", role="prefill", reason="prefix_hit"
    ) == (TURNS - 1)
    assert _metric(metrics, "k2serve_router_predicted_hit_tokens_total") == sum(reuse)
    assert _metric(metrics, "k2serve_router_prefill_cached_tokens_total") == sum(reuse)

    # least-loaded: idle workers take turns, so the turns spread and the second turn reuses nothing.
    turns, blocks, metrics = results["least-loaded"]
    cached = [c for _, _, c in turns]
    assert min(blocks.values()) > 0  # both prefill workers computed turns
    assert cached[1] == 0 and sum(cached) < sum(reuse)
    assert _metric(metrics, "k2serve_router_routing_decisions_total", role="prefill", reason="load") == TURNS
    assert _metric(metrics, "k2serve_router_predicted_hit_tokens_total") == 0
