"""/v1/completions, /v1/models, /health and /metrics through a real server; tokens equal the offline LLM's."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from conftest import API_ENGINE
from prometheus_client.parser import text_string_to_metric_families

from k2serve.engine.llm import LLM
from k2serve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(120)
IDS = [[5, 17, 300, 42, 9, 1000, 77, 3], [11, 12, 13], list(range(200, 260))]


def test_token_id_prompts_match_the_offline_llm(api_client: openai.OpenAI, tiny_ckpt: Path) -> None:
    llm = LLM(tiny_ckpt, "float32", API_ENGINE)  # the engine api_client talks to
    offline = llm.generate(IDS, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    extra = {"ignore_eos": True, "return_token_ids": True}
    for ids, ref in zip(IDS, offline, strict=True):
        r = api_client.completions.create(
            model="tiny", prompt=ids, max_tokens=10, temperature=0, extra_body=extra
        )
        choice = r.choices[0]
        assert choice.model_extra is not None and choice.model_extra["token_ids"] == ref.token_ids
        assert choice.text == ref.text and choice.finish_reason == "length"
        assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 10)
    batch = api_client.completions.create(
        model="tiny", prompt=IDS, max_tokens=10, temperature=0, extra_body=extra
    )
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.model_extra["token_ids"] for c in batch.choices] == [o.token_ids for o in offline]  # type: ignore[index]
    assert batch.usage is not None and batch.usage.completion_tokens == 30


def test_text_prompts_streamed_and_not(api_client: openai.OpenAI) -> None:
    prompts = ["The capital of France is", "1, 2, 3,"]
    kw = {"model": "tiny", "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = api_client.completions.create(prompt=prompts, **kw)  # type: ignore[call-overload]
    texts = ["", ""]
    finish: list[str | None] = [None, None]
    usage = None
    stream = api_client.completions.create(
        prompt=prompts, stream=True, stream_options={"include_usage": True}, **kw
    )  # type: ignore[call-overload]
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.text for c in full.choices] and finish == ["length", "length"]
    assert (
        usage is not None
        and usage.completion_tokens == 24
        and usage.prompt_tokens == full.usage.prompt_tokens
    )  # type: ignore[union-attr]


def test_completion_logprobs(api_client: openai.OpenAI) -> None:
    r = api_client.completions.create(
        model="tiny", prompt=IDS[0], max_tokens=5, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 5
    assert lp.token_logprobs is not None and all(v <= 0 for v in lp.token_logprobs)
    assert lp.top_logprobs is not None and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset is not None and lp.text_offset[0] == 0


def test_models_health_and_metrics(api_client: openai.OpenAI, api_url: str) -> None:
    assert [m.id for m in api_client.models.list().data] == ["tiny"]
    assert httpx.get(f"{api_url}/health").json() == {"status": "ok", "ready": True}
    assert httpx.get(f"{api_url}/health/live").json() == {"status": "live"}
    api_client.completions.create(model="tiny", prompt=IDS[1], max_tokens=3, temperature=0)
    metrics = httpx.get(f"{api_url}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in (
        "k2serve_time_to_first_token_seconds_bucket",
        "k2serve_inter_token_latency_seconds_bucket",
        "k2serve_request_latency_seconds_count",
        "k2serve_requests_running",
        "k2serve_requests_waiting",
        "k2serve_kv_blocks_used",
        "k2serve_kv_blocks_total 512.0",
        "k2serve_prefix_cache_hit_rate",
        "k2serve_preemptions_total",
        'k2serve_requests_total{endpoint="completions",finish_reason="length",status="200"}',
        "k2serve_prompt_tokens_total",
        "k2serve_generation_tokens_total",
    ):
        assert name in metrics.text, name


def test_serve_exports_vllm_metrics(api_client: openai.OpenAI, api_url: str) -> None:
    """`k2serve serve`'s /metrics carries the engine's vLLM names (model_name, engine, role labels)."""
    labels = {"model_name": "tiny", "engine": "0", "role": "serve"}

    def scrape() -> dict[str, float]:
        text = httpx.get(f"{api_url}/metrics").text
        return {
            s.name + ("/" + s.labels["finished_reason"] if "finished_reason" in s.labels else ""): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name.startswith("vllm:") and {k: s.labels.get(k) for k in labels} == labels
        }

    before = scrape()
    api_client.completions.create(
        model="tiny", prompt=IDS[0], max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    after = scrape()
    for name, delta in (
        ("vllm:prompt_tokens_total", len(IDS[0])),
        ("vllm:generation_tokens_total", 4),
        ("vllm:request_success_total/length", 1),
        ("vllm:time_to_first_token_seconds_count", 1),
        ("vllm:inter_token_latency_seconds_count", 3),
        ("vllm:e2e_request_latency_seconds_count", 1),
        ("vllm:request_queue_time_seconds_count", 1),
    ):
        assert after[name] - before[name] == delta, name
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert after[gauge] == 0, gauge
    assert after["vllm:prefix_cache_queries_total"] >= before["vllm:prefix_cache_queries_total"] + len(IDS[0])
