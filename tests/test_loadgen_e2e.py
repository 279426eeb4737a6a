"""`k2serve bench serve` end to end against a real in-process server (AsyncEngine on the tiny checkpoint):
a Mooncake trace replay with real prefix-cache hits, a random-dataset run, and HTTP error paths."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import tiny_api_server

from k2serve.engine.config import EngineConfig
from k2serve.loadgen.benchmark import run_benchmark
from k2serve.loadgen.cli import main
from k2serve.loadgen.config import BenchConfig
from k2serve.loadgen.trace import TraceScaling, read_trace, trace_requests

pytestmark = pytest.mark.timeout(120)
CONFIG = EngineConfig(num_kv_blocks=512, block_size=8)
TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"


@pytest.fixture(scope="module")
def url(tiny_ckpt: Path) -> Iterator[str]:
    with tiny_api_server(tiny_ckpt, config=CONFIG) as (base, _):
        yield base


def test_trace_replay_hits_the_prefix_cache(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = TRACES / "conversation_trace.jsonl"
    if not trace.exists():
        pytest.skip(f"{trace} is absent: the Mooncake traces live only in the k2serve workspace")
    out = tmp_path / "trace"
    argv = [
        "--url", url, "--trace", str(trace), "--num-prompts", "20", "--length-scale", "0.015625",
        "--time-scale", "0.1", "--slo-ttft", "5000", "--slo-tpot", "500", "--progress-interval", "1",
        "--result-json", str(out / "result.json"), "--plot-dir", str(out / "plots"),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "k2serve bench serve" in printed.out and "prefix cache" in printed.out
    assert "reproduce          k2serve bench serve --backend http" in printed.out
    assert "sent 20/20" in printed.err  # progress on stderr

    result = json.loads((out / "result.json").read_text())
    c = result["counts"]
    assert (c["sent"], c["completed"], c["failed"], c["rejected"]) == (20, 20, 0, 0)
    assert result["stopped_by"] == "dataset_end" and result["errors"] == {}
    # every request produced exactly the (scaled) output length it asked for
    expected = [
        r.output_len
        for r in trace_requests(read_trace(trace, limit=20), TraceScaling(length_scale=1 / 64), 0)
    ]
    assert [r["output_tokens"] for r in result["requests"]] == expected
    assert c["output_len_mismatch"] == 0
    # the first 20 requests share hash id 0 (one 8-token block after scaling): the cache must hit
    pc = result["prefix_cache"]
    assert pc["prompt_tokens"] == sum(r["prompt_len"] for r in result["requests"])
    assert pc["best_cached_tokens"] == 19 * 8
    assert 0 < pc["cached_tokens"] <= pc["best_cached_tokens"]
    assert 0 < pc["measured_hit_ratio"] <= pc["best_hit_ratio"]
    for name in ("ttft", "tpot", "itl", "e2e"):
        s = result["latency_ms"][name]
        assert s["n"] > 0 and 0 < s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert result["throughput"]["requests_per_s"] > 0 and result["goodput"]["fraction"] is not None
    assert sorted(Path(p).name for p in result["plots"]) == ["latency_cdf.png", "timeline.png"]
    for p in result["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_random_dataset_at_fixed_concurrency(url: str, tmp_path: Path) -> None:
    config = BenchConfig(
        url=url, num_prompts=8, max_concurrency=3, input_len=(16, 48), output_len=(4, 12), seed=5,
        result_json=str(tmp_path / "r.json"), plot_dir=str(tmp_path / "plots"), progress_interval_s=60,
    )  # fmt: skip
    result = run_benchmark(config, "cmd")
    assert result["counts"]["completed"] == 8 and result["stopped_by"] == "num_prompts"
    reqs = result["requests"]
    assert all(r["output_tokens"] == r["requested_output_len"] for r in reqs)
    assert {r["requested_output_len"] for r in reqs} != {reqs[0]["requested_output_len"]}  # lengths vary
    assert all(16 <= r["prompt_len"] <= 48 for r in reqs)
    assert all(0 < r["ttft_ms"] < r["e2e_ms"] for r in reqs)
    assert result["prefix_cache"]["best_hit_ratio"] is None and result["goodput"] is None
    assert json.loads((tmp_path / "r.json").read_text())["counts"] == result["counts"]
    assert (tmp_path / "plots" / "timeline.png").stat().st_size > 0


def test_http_errors_are_counted_by_status(url: str) -> None:
    wrong = run_benchmark(BenchConfig(url=url, model="nope", num_prompts=2, progress_interval_s=60), "c")
    assert wrong["errors"] == {"404": 2} and wrong["counts"]["completed"] == 0
    assert "does not exist" in wrong["requests"][0]["error_detail"]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused = run_benchmark(
        BenchConfig(url=f"http://127.0.0.1:{port}", num_prompts=2, progress_interval_s=60), "c"
    )
    assert refused["errors"] == {"connect_error": 2}
    assert main(["--url", f"http://127.0.0.1:{port}", "--num-prompts", "1"]) == 1  # nothing completed
