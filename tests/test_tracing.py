"""OpenTelemetry tracing: settings from OTEL_* / --otlp-traces-endpoint, off and free when not configured,
both OTLP protocols against real receivers, and one request through a real cluster whose router, prefill
and decode spans land in the client's trace with the right parents."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from otlp_collector import ReceivedSpan, otlp_grpc_collector, otlp_http_collector

from k2serve.cluster.local import ClusterSpec, LocalCluster
from k2serve.config import ModelConfig
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm import LLM
from k2serve.engine.sampling_params import SamplingParams
from k2serve.proto import api_pb2, api_pb2_grpc, common_pb2
from k2serve.tracing.settings import TracingSettings
from k2serve.tracing.tracer import NOOP, NOOP_SPAN, make_tracer

REPO = Path(__file__).resolve().parents[1]
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
GRPC_TRACE = "0af7651916cd43dd8448eb211c80319c"
GRPC_SPAN = "b7ad6b7169203331"


# ---- settings ---------------------------------------------------------------------------------------
def test_settings_follow_the_otel_variables() -> None:
    resolve = TracingSettings.resolve
    assert resolve("router", None, {}) is None
    s = resolve("prefill", None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318/"})
    assert s == TracingSettings("http://otel:4318/v1/traces", "http/protobuf", "k2serve-prefill", "prefill")
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_SERVICE_NAME": "kimi",
    }
    assert resolve("decode", None, env) == TracingSettings("http://otel:4317", "grpc", "kimi", "decode")
    # the signal's own variables win over the generic ones; the flag wins over both
    env |= {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/x",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    }
    assert resolve("decode", None, env) == TracingSettings("http://t:1/x", "http/protobuf", "kimi", "decode")
    assert resolve("decode", "http://flag:9/v1/traces", env).endpoint == "http://flag:9/v1/traces"
    assert resolve("router", "http://flag:9", {"OTEL_SDK_DISABLED": "true"}) is None
    assert resolve("router", None, env | {"OTEL_TRACES_EXPORTER": "none"}) is None
    with pytest.raises(ValueError, match=r"OTLP protocol must be one of .* got 'http/json'"):
        resolve("router", "http://x:1", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    with pytest.raises(ValueError, match="must be an http:// or https:// URL, got 'otel:4317'"):
        resolve("router", "otel:4317", {})


def test_up_passes_the_endpoint_to_every_process(tmp_path: Path) -> None:
    spec = ClusterSpec(model_dir=str(tmp_path), otlp_traces_endpoint="http://otel:4318/v1/traces")
    flag = ["--otlp-traces-endpoint", "http://otel:4318/v1/traces"]
    for args in (
        spec.router_args_for("127.0.0.1", 0, 0, []),
        spec.worker_args("prefill", "p0", "127.0.0.1", "127.0.0.1:1"),
        spec.worker_args("decode", "d0", "127.0.0.1", "127.0.0.1:1"),
    ):
        i = args.index(flag[0])
        assert args[i : i + 2] == flag


def test_the_flag_reaches_each_roles_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from k2serve.cli.parser import build_parser
    from k2serve.cli.settings import router_settings, worker_settings

    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    parser = build_parser()
    flag = ["--model", str(tmp_path), "--otlp-traces-endpoint", "http://otel:4317", "--insecure-internal"]
    router = router_settings(parser.parse_args(["router", *flag])).tracing
    assert router == TracingSettings("http://otel:4317", "grpc", "k2serve-router", "router")
    for role in ("prefill", "decode"):
        tracing = worker_settings(role, parser.parse_args([role, *flag])).tracing
        assert tracing == TracingSettings("http://otel:4317", "grpc", f"k2serve-{role}", role)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL")
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert (
        router_settings(
            parser.parse_args(["router", "--model", str(tmp_path), "--insecure-internal"])
        ).tracing
        is None
    )


def test_off_imports_no_sdk_and_adds_no_metadata() -> None:
    """Without settings every process runs the no-op tracer: the servers' modules and a request's worth
    of span calls import neither the tracing SDK nor an exporter (FastAPI and redis import the API and
    the metrics SDK themselves when installed), and no traceparent goes out."""
    code = """
import json, sys
SDK = ("opentelemetry.sdk.trace", "opentelemetry.exporter", "k2serve.tracing.otel")
import k2serve.router.main, k2serve.prefill.main, k2serve.decode.main, k2serve.cli.commands
from k2serve.tracing.tracer import make_tracer, NOOP_SPAN
t = make_tracer(None)
s = t.start("router.request", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", kind="server")
with s.child("router.route") as c:
    c.set("k", 1)
print(json.dumps({"same": s is NOOP_SPAN and c is NOOP_SPAN, "metadata": s.metadata(),
                  "sdk": sorted(m for m in sys.modules if m.startswith(SDK))}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {"same": True, "metadata": None, "sdk": []}
    assert make_tracer(None) is NOOP and not NOOP.enabled and NOOP_SPAN.traceparent == ""


# ---- both exporters against real receivers ----------------------------------------------------------
@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_spans_reach_a_real_otlp_receiver(protocol: str) -> None:
    receiver = otlp_http_collector if protocol == "http/protobuf" else otlp_grpc_collector
    with receiver() as (collector, url):
        endpoint = url + "/v1/traces" if protocol == "http/protobuf" else url
        tracer = make_tracer(TracingSettings(endpoint, protocol, "k2serve-decode", "decode"))
        parent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
        span = tracer.start("decode.request", parent, kind="server", attributes={"k2serve.request_id": "r1"})
        child = span.child("decode.stream", attributes={"k2serve.completion_tokens": 7})
        child.end()
        span.fail(ValueError("bad"))
        span.end()
        assert span.traceparent.startswith(f"00-{CLIENT_TRACE}-") and span.metadata() == (
            ("traceparent", span.traceparent),
        )
        tracer.shutdown()  # flushes
        spans = {s.name: s for s in collector.wait_for(lambda got: len(got) == 2, timeout=10)}
    root, stream = spans["decode.request"], spans["decode.stream"]
    assert (root.trace_id, root.parent_id, root.kind) == (CLIENT_TRACE, CLIENT_SPAN, "server")
    assert root.span_id == span.traceparent.split("-")[2]
    assert (stream.trace_id, stream.parent_id) == (CLIENT_TRACE, root.span_id)
    assert root.service == stream.service == "k2serve-decode"
    assert root.attributes["k2serve.request_id"] == "r1"
    assert stream.attributes["k2serve.completion_tokens"] == 7


def test_a_malformed_traceparent_starts_a_new_trace() -> None:
    with otlp_http_collector() as (collector, url):
        tracer = make_tracer(TracingSettings(url + "/v1/traces", role="router"))
        for bad in (
            "garbage",
            f"00-{'0' * 32}-{CLIENT_SPAN}-01",
            f"00-{CLIENT_TRACE}-{CLIENT_SPAN}",
            "x" * 500,
        ):
            tracer.start("router.request", bad).end()
        tracer.shutdown()
        spans = collector.wait_for(lambda got: len(got) == 4, timeout=10)
    assert all(s.parent_id == "" and s.trace_id not in (CLIENT_TRACE, "0" * 32) for s in spans)
    assert len({s.trace_id for s in spans}) == 4


# ---- one request through a real cluster -------------------------------------------------------------
def _one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, found)
    return found[0]


ROUTER = [
    "router.request",
    "router.admission",
    "router.route",
    "router.reserve",
    "router.prefill",
    "router.decode",
]
PREFILL = ["prefill.request", "prefill.queue", "prefill.compute", "kv.flush"]
DECODE = ["decode.reserve", "decode.request", "kv.receive", "kv.verify", "decode.queue"]
DECODE += ["decode.first_token", "decode.stream"]


def _complete(trace_id: str, layers: int) -> object:
    def done(spans: list[ReceivedSpan]) -> bool:
        names = [s.name for s in spans if s.trace_id == trace_id]
        return all(n in names for n in ROUTER + PREFILL + DECODE) and names.count("kv.send_layer") == layers

    return done


@pytest.mark.slow
def test_one_request_is_one_trace_across_router_prefill_and_decode(tiny_ckpt: Path, tmp_path: Path) -> None:
    cfg = ModelConfig.from_file(tiny_ckpt)
    prompt = [(7 * i + 3) % 1000 for i in range(37)]
    max_tokens = 5
    with otlp_http_collector() as (collector, url):
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": url, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
        spec = ClusterSpec(
            model_dir=str(tiny_ckpt),
            port=0,
            grpc_port=0,
            use_redis=False,
            engine_args=("--kv-cache-mb", "32", "--block-size", "8"),
            workdir=str(tmp_path),
            env=env,
        )
        with LocalCluster(spec) as cluster:
            r = httpx.post(
                f"{cluster.http_url}/v1/completions",
                json={
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "return_token_ids": True,
                },
                headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            http_tokens = r.json()["choices"][0]["token_ids"]

            async def generate() -> list[int]:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as ch:
                    req = api_pb2.GenerateRequest(
                        token_ids=api_pb2.TokenIds(ids=prompt),
                        sampling=common_pb2.SamplingParams(
                            temperature=0, max_tokens=max_tokens, ignore_eos=True
                        ),
                    )
                    md = (("traceparent", f"00-{GRPC_TRACE}-{GRPC_SPAN}-01"),)
                    return [
                        t
                        async for c in api_pb2_grpc.K2ServeStub(ch).Generate(req, metadata=md)
                        for t in c.token_ids
                    ]

            grpc_tokens = asyncio.run(generate())
            layers = cfg.num_hidden_layers
            spans = collector.wait_for(_complete(CLIENT_TRACE, layers), timeout=30)
            spans = collector.wait_for(_complete(GRPC_TRACE, layers), timeout=30)

    # tracing changes no token
    llm = LLM(tiny_ckpt, engine_config=EngineConfig(num_kv_blocks=256, block_size=8))
    expected = llm.generate(
        [prompt], [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)]
    )
    assert http_tokens == grpc_tokens == expected[0].token_ids

    for trace_id, client_span in ((CLIENT_TRACE, CLIENT_SPAN), (GRPC_TRACE, GRPC_SPAN)):
        mine = [s for s in spans if s.trace_id == trace_id]
        by = {name: _one(mine, name) for name in ROUTER + PREFILL + DECODE}
        assert {s.service for s in mine} == {"k2serve-router", "k2serve-prefill", "k2serve-decode"}
        for names, service in ((ROUTER, "router"), (PREFILL, "prefill"), (DECODE, "decode")):
            assert {by[n].service for n in names} == {f"k2serve-{service}"}, names
        # the client's span is the router's parent; each worker's server span is the router's client span's child
        assert (by["router.request"].parent_id, by["router.request"].kind) == (client_span, "server")
        for n in ROUTER[1:]:
            assert by[n].parent_id == by["router.request"].span_id, n
        for client, server in (
            ("router.reserve", "decode.reserve"),
            ("router.prefill", "prefill.request"),
            ("router.decode", "decode.request"),
        ):
            assert (by[client].kind, by[server].kind) == ("client", "server")
            assert by[server].parent_id == by[client].span_id, server
        for n in ("prefill.queue", "prefill.compute", "kv.flush"):
            assert by[n].parent_id == by["prefill.request"].span_id, n
        sends = [s for s in mine if s.name == "kv.send_layer"]
        assert sorted(s.attributes["k2serve.layer"] for s in sends) == list(range(cfg.num_hidden_layers))
        assert {s.parent_id for s in sends} == {by["prefill.compute"].span_id}
        # the KV transfer continues the prefill worker's span in the decode worker (KVChunkHeader.traceparent)
        assert by["kv.receive"].parent_id == by["prefill.request"].span_id
        assert by["kv.verify"].parent_id == by["kv.receive"].span_id
        latent = len(prompt) * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
        assert by["kv.receive"].attributes["k2serve.kv.bytes"] == latent
        for n in ("decode.queue", "decode.first_token", "decode.stream"):
            assert by[n].parent_id == by["decode.request"].span_id, n
        # the prefill's first token plus max_tokens - 1 streamed by the decode worker
        assert by["decode.stream"].attributes["k2serve.completion_tokens"] == max_tokens
        assert by["router.decode"].attributes["k2serve.completion_tokens"] == max_tokens - 1
        # times nest: the transfer happens inside the prefill, the stream after the first token
        assert by["kv.verify"].start_ns >= by["kv.receive"].start_ns
        assert by["kv.verify"].end_ns == by["kv.receive"].end_ns
        assert by["decode.first_token"].end_ns <= by["decode.stream"].start_ns
        assert by["router.request"].start_ns <= by["router.route"].start_ns <= by["router.prefill"].start_ns
        assert by["router.prefill"].end_ns <= by["router.decode"].start_ns
