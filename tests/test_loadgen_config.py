"""Settings of `k2serve bench serve`: validation names the field and value, the printed command line
reproduces the config, and the small pure parts (random dataset, arrivals, SSE lines, gRPC targets)."""

from __future__ import annotations

import math

import pytest

from k2serve.loadgen.cli import build_parser, config_from_args, reproduce_command
from k2serve.loadgen.client import SSE_DONE, SSEFormatError, parse_sse_line
from k2serve.loadgen.config import BenchConfig, BenchConfigError, GRPCTargetError, grpc_target
from k2serve.loadgen.dataset import LengthRangeError, poisson_arrivals, random_requests


def parse(*argv: str) -> BenchConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize(
    ("kwargs", "name", "value"),
    [
        ({"backend": "ws", "num_prompts": 1}, "backend", "ws"),
        ({"url": "ftp://x:1", "num_prompts": 1}, "url", "ftp://x:1"),
        ({"backend": "grpc", "url": "http://x:1", "num_prompts": 1}, "url", "http://x:1"),
        ({"num_prompts": 0}, "num_prompts", 0),
        ({"num_prompts": 1, "request_rate": 0.0}, "request_rate", 0.0),
        ({"num_prompts": 1, "max_concurrency": 0}, "max_concurrency", 0),
        ({"num_prompts": 1, "input_len": (5, 2)}, "input_len", (5, 2)),
        ({"duration_s": 5.0, "warmup_s": 5.0}, "warmup_s", 5.0),
        ({"duration_s": math.inf}, "duration_s", math.inf),
        ({}, "num_prompts", None),  # the random dataset is endless
        ({"duration_s": 5.0}, "num_prompts", None),  # rate inf, no concurrency cap: unbounded burst
        ({"dataset": "trace", "num_prompts": 1}, "trace", None),
        ({"num_prompts": 1, "trace": "t.jsonl"}, "trace", "t.jsonl"),
        ({"num_prompts": 1, "slo_ttft_ms": -1.0}, "slo_ttft_ms", -1.0),
        ({"num_prompts": 1, "length_scale": float("nan")}, "length_scale", "nan"),
    ],
)
def test_invalid_settings_name_the_field_and_value(kwargs: dict, name: str, value: object) -> None:
    with pytest.raises(BenchConfigError) as info:
        BenchConfig(**kwargs)
    assert info.value.name == name
    if value == "nan":
        assert math.isnan(info.value.value)
    else:
        assert info.value.value == value


def test_defaults_and_derived_arrivals() -> None:
    c = parse("--num-prompts", "3")
    assert (c.backend, c.url, c.dataset, c.arrival_rate) == (
        "http",
        "http://127.0.0.1:8000",
        "random",
        math.inf,
    )
    g = parse("--backend", "grpc", "--trace", "t.jsonl")
    assert (g.url, g.dataset, g.arrival_rate, g.num_prompts) == (
        "grpc://127.0.0.1:50051",
        "trace",
        None,
        None,
    )
    assert parse("--trace", "t.jsonl", "--request-rate", "2").arrival_rate == 2.0
    assert parse("--num-prompts", "3", "--input-len", "10:20").input_len == (10, 20)
    assert parse("--num-prompts", "3", "--output-len", "7").output_len == (7, 7)
    with pytest.raises(SystemExit):
        parse("--num-prompts", "3", "--input-len", "a:b")


@pytest.mark.parametrize(
    "argv",
    [
        ["--num-prompts", "5", "--request-rate", "inf", "--input-len", "3:9", "--slo-ttft", "200", "--seed", "4"],
        ["--duration", "30", "--max-concurrency", "4", "--warmup", "5", "--model", "m", "--plot-dir", "out dir"],
        ["--backend", "grpc", "--url", "grpc://h:1", "--trace", "t.jsonl", "--time-scale", "0.1",
         "--length-scale", "0.015625", "--request-rate", "3.5", "--result-json", "r.json", "--slo-tpot", "50"],
    ],
)  # fmt: skip
def test_printed_command_reproduces_the_config(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("K2SERVE_API_KEY", raising=False)
    config = parse(*argv)
    line = reproduce_command(config)
    assert line.startswith("k2serve bench serve ")
    import shlex

    assert parse(*shlex.split(line)[3:]) == config


def test_api_key_is_never_printed_or_written(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K2SERVE_API_KEY", "s3cret")
    config = parse("--num-prompts", "1")
    assert config.api_key == "s3cret"
    assert "s3cret" not in reproduce_command(config) and "$K2SERVE_API_KEY" in reproduce_command(config)
    assert "s3cret" not in repr(config) and "s3cret" not in str(config.to_json())
    assert config.to_json()["api_key_set"] is True and config.to_json()["request_rate"] is None
    assert parse("--num-prompts", "1", "--request-rate", "inf").to_json()["request_rate"] == "inf"


def test_random_dataset_is_seeded_and_in_range() -> None:
    def take(seed: int) -> list:
        gen = random_requests(seed, (4, 8), (2, 3), vocab_size=10)
        return [next(gen) for _ in range(50)]

    a = take(1)
    assert a == take(1) and a != take(2)
    assert all(4 <= len(r.prompt) <= 8 and 2 <= r.output_len <= 3 for r in a)
    assert {len(r.prompt) for r in a} == {4, 5, 6, 7, 8}
    assert all(0 <= t < 10 for r in a for t in r.prompt) and [r.index for r in a] == list(range(50))
    assert all(r.arrival_s is None and r.best_cached_tokens == 0 for r in a)
    with pytest.raises(LengthRangeError) as info:
        next(random_requests(0, (0, 3), (1, 1), 10))
    assert info.value.value == (0, 3)


def test_poisson_arrivals() -> None:
    gen = poisson_arrivals(10.0, seed=0)
    times = [next(gen) for _ in range(5001)]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert times[0] == 0.0 and all(g >= 0 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.05)  # mean gap 1/rate
    burst = poisson_arrivals(math.inf, seed=0)
    assert [next(burst) for _ in range(3)] == [0.0, 0.0, 0.0]


def test_sse_lines() -> None:
    assert parse_sse_line('data: {"choices": []}') == {"choices": []}
    assert parse_sse_line("data: [DONE]") == SSE_DONE
    assert parse_sse_line("") is None and parse_sse_line(": keep-alive") is None
    assert parse_sse_line("event: x") is None
    with pytest.raises(SSEFormatError, match="not a JSON object"):
        parse_sse_line("data: [1, 2]")
    with pytest.raises(SSEFormatError):
        parse_sse_line("data: {oops")


def test_grpc_targets() -> None:
    assert grpc_target("grpc://127.0.0.1:50051") == ("127.0.0.1:50051", False)
    assert grpc_target("localhost:9") == ("localhost:9", False)
    assert grpc_target("grpcs://example.org:443") == ("example.org:443", True)
    assert grpc_target("grpc://[::1]:5") == ("[::1]:5", False)
    for bad in ("http://h:1", "grpc://h", "grpc://h:1/path", "h:abc", "h:99999"):
        with pytest.raises(GRPCTargetError) as info:
            grpc_target(bad)
        assert info.value.url == bad
