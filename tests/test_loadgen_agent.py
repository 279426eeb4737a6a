"""`k2serve bench serve` driving the chat dialects and tool-loop agent conversations against a real
`k2serve serve` process (tiny preset): every turn makes the forced tool call, whole-history resends grow,
sessions and previous_response_id report cached tokens equal to the server's prefix-cache hits, the
Anthropic and Responses streams give TTFT, and bad flag combinations are refused naming the problem."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import local_cluster_spec, serve_process

from k2serve.cluster.local import LocalCluster
from k2serve.loadgen.benchmark import run_benchmark
from k2serve.loadgen.cli import build_parser, config_from_args, main
from k2serve.loadgen.config import BenchConfig
from k2serve.loadgen.report import format_report

pytestmark = pytest.mark.timeout(240)
KEY = "agent-bench-key"
TURNS, CONVERSATIONS = 3, 2


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's K2SERVE_HOME: its tiny checkpoint (and tokenizer) is models/tiny-seed0 there."""
    return tmp_path_factory.mktemp("agentbench")


@pytest.fixture(scope="module")
def url(home: Path) -> Iterator[str]:
    with serve_process(home, KEY) as served:
        yield served


def prefix_hits(url: str) -> float:
    """The server's prefix-cache hit counter (prompt tokens found in the cache)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    m = re.search(r"^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)$", text, re.MULTILINE)
    assert m, text[:2000]
    return float(m.group(1))


def agent_run(url: str, endpoint: str, history: str, seed: int = 3) -> dict[str, Any]:
    config = BenchConfig(
        url=url, api_key=KEY, endpoint=endpoint, agent_turns=TURNS, history=history,
        num_prompts=CONVERSATIONS, max_concurrency=CONVERSATIONS, input_len=(8, 8), output_len=(32, 32),
        tool_result_len=8, seed=seed, progress_interval_s=60,
    )  # fmt: skip
    return run_benchmark(config, "cmd")


def conversations(result: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for r in result["requests"]:
        out.setdefault(r["conversation"], []).append(r)
    assert sorted(out) == list(range(CONVERSATIONS))
    for turns in out.values():
        assert [r["turn"] for r in turns] == list(range(TURNS))
    return out


def assert_every_turn_called_the_tool(result: dict[str, Any]) -> None:
    assert result["counts"]["completed"] == CONVERSATIONS * TURNS and result["errors"] == {}
    for r in result["requests"]:
        assert r["error"] is None and r["tool_calls"] == 1, r
        assert 0 < r["ttft_ms"] <= r["e2e_ms"]
        assert r["output_tokens"] is not None and 0 < r["output_tokens"] <= 32
    assert [t["completed"] for t in result["turns"]] == [CONVERSATIONS] * TURNS
    assert [t["tool_calls"] for t in result["turns"]] == [CONVERSATIONS] * TURNS


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/messages", "/v1/responses"])
def test_resending_the_history_grows_every_turn(url: str, endpoint: str) -> None:
    result = agent_run(url, endpoint, "resend")
    assert_every_turn_called_the_tool(result)
    for turns in conversations(result).values():
        prompts = [r["prompt_tokens"] for r in turns]  # the server's usage: text prompts have no prompt_len
        assert prompts == sorted(prompts) and len(set(prompts)) == TURNS, prompts
        sizes = [r["body_bytes"] for r in turns]
        assert sizes == sorted(sizes) and len(set(sizes)) == TURNS, sizes
    for t in result["turns"]:
        assert t["ttft"]["n"] == CONVERSATIONS and t["ttft"]["p50"] > 0
    report = format_report(result)
    assert "per turn" in report and "tool loop: 3 turns, history resend" in report


@pytest.mark.parametrize(
    ("endpoint", "history"),
    [("/v1/chat/completions", "session"), ("/v1/responses", "previous_response_id")],
)
def test_carried_history_reports_the_servers_cached_tokens(url: str, endpoint: str, history: str) -> None:
    before = prefix_hits(url)
    result = agent_run(url, endpoint, history, seed=11)  # a seed no other test sends
    hits = prefix_hits(url) - before
    assert_every_turn_called_the_tool(result)
    cached = [r["cached_tokens"] for r in result["requests"]]
    assert sum(cached) == hits  # what the client reports is what the server's cache served
    resent = agent_run(url, endpoint, "resend", seed=12)
    for carried, whole in zip(conversations(result).values(), conversations(resent).values(), strict=True):
        assert all(r["cached_tokens"] > 0 for r in carried[1:])
        # the same turns (the prompts differ only by seed) carried, not resent: smaller bodies
        assert all(c["body_bytes"] < w["body_bytes"] for c, w in zip(carried[1:], whole[1:], strict=True))
        prompts = [r["prompt_tokens"] for r in carried]
        assert prompts == sorted(prompts) and len(set(prompts)) == TURNS  # the server still sees it all
    assert resent["counts"]["completed"] == CONVERSATIONS * TURNS


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/messages", "/v1/responses"])
def test_single_requests_on_each_chat_endpoint(url: str, endpoint: str, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    argv = [
        "--url", url, "--api-key", KEY, "--endpoint", endpoint, "--num-prompts", "3", "--max-concurrency", "2",
        "--input-len", "8:24", "--output-len", "6", "--progress-interval", "60", "--result-json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["counts"]["completed"] == 3 and result["turns"] is None
    for r in result["requests"]:
        assert (
            0 < r["ttft_ms"] <= r["e2e_ms"]
            and r["prompt_len"] == 0
            and r["prompt_tokens"] > 8
            and r["num_chunks"] >= 1
        )
        assert r["output_tokens"] is not None and 1 <= r["output_tokens"] <= 6
    assert result["latency_ms"]["ttft"]["n"] == 3
    if endpoint == "/v1/chat/completions":  # the only one of the three that takes ignore_eos
        assert [r["output_tokens"] for r in result["requests"]] == [6, 6, 6]


def test_a_text_dataset_on_a_chat_endpoint(url: str, home: Path, tmp_path: Path) -> None:
    """A custom dataset's prompts go as the user message (their token count from the server's tokenizer)."""
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Name three colours."}\n{"prompt": "Count from one to five, please."}\n')
    config = BenchConfig(
        url=url, api_key=KEY, endpoint="/v1/chat/completions", dataset="custom", dataset_path=str(data),
        tokenizer=str(home / "models" / "tiny-seed0"), custom_output_len=5, progress_interval_s=60,
    )  # fmt: skip
    result = run_benchmark(config, "cmd")
    assert result["counts"]["completed"] == 2 and result["stopped_by"] == "dataset_end"
    for r in result["requests"]:
        assert 0 < r["prompt_len"] < r["prompt_tokens"]  # the chat template wraps the prompt
        assert r["output_tokens"] == r["requested_output_len"] == 5 and 0 < r["ttft_ms"] <= r["e2e_ms"]


def test_a_failed_turn_ends_its_conversation(url: str) -> None:
    config = BenchConfig(
        url=url, api_key="wrong", endpoint="/v1/chat/completions", agent_turns=3, history="session",
        num_prompts=1, input_len=(4, 4), output_len=(8, 8), progress_interval_s=60,
    )  # fmt: skip
    result = run_benchmark(config, "cmd")
    assert [(r["turn"], r["error"]) for r in result["requests"]] == [(0, "session_create:401")]


@pytest.mark.slow
def test_session_mode_on_a_cluster(tiny_ckpt: Path, tmp_path: Path) -> None:
    """Sessions in Redis behind the router (prefill + decode workers): every turn calls the tool, and the
    turns after the first are served from the cached prefix of the session's holder."""
    with LocalCluster(local_cluster_spec(tiny_ckpt, tmp_path, use_redis=True)) as cluster:
        result = agent_run(cluster.http_url, "/v1/chat/completions", "session", seed=21)
    assert_every_turn_called_the_tool(result)
    for turns in conversations(result).values():
        assert all(r["cached_tokens"] > 0 for r in turns[1:])
        assert all(r["cached_tokens"] < r["prompt_tokens"] for r in turns)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--agent-turns", "2"], "need a chat endpoint"),
        (["--endpoint", "/v1/responses", "--agent-turns", "2", "--agent-history", "session"], "needs endpoint /v1/chat/completions"),
        (["--endpoint", "/v1/chat/completions", "--agent-turns", "2", "--agent-history", "previous_response_id"], "needs endpoint /v1/responses"),
        (["--endpoint", "/v1/responses", "--agent-history", "previous_response_id"], "give agent_turns too"),
        (["--backend", "grpc", "--endpoint", "/v1/messages"], "is for the http backend"),
        (["--endpoint", "/v1/messages", "--trace", "t.jsonl"], "the chat endpoints send text"),
        (["--endpoint", "/v1/messages", "--agent-turns", "0"], "agent_turns=0: must be >= 1"),
        (["--endpoint", "/v1/messages", "--agent-turns", "2", "--tool-result-len", "0"], "must be >= 1"),
        (["--endpoint", "/v1/embeddings"], "invalid choice"),
    ],
)  # fmt: skip
def test_bad_flag_combinations_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--num-prompts", "1"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_vllm_backend_names() -> None:
    chat = config_from_args(build_parser().parse_args(["--backend", "openai-chat", "--num-prompts", "1"]))
    assert (chat.backend, chat.endpoint) == ("http", "/v1/chat/completions")
    plain = config_from_args(build_parser().parse_args(["--backend", "openai", "--num-prompts", "1"]))
    assert (plain.backend, plain.endpoint) == ("http", "/v1/completions")
