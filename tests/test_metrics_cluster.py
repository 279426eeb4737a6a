"""Metrics of a live 1P1D cluster: every worker serves its vLLM-named metrics at the metrics_url the router
lists; the counters equal what the requests did (prompt tokens on the prefill side, each generated token
counted once across the two sides, one success per request per side, the KV bytes both sides moved);
and every metric the chart's Grafana dashboard and PrometheusRule query is exported by the router or a
worker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from cluster_calls import http_greedy
from conftest import local_cluster_spec
from monitoring_queries import TARGET_LABELS, expressions, metric_names, selector_labels
from prometheus_client.parser import text_string_to_metric_families

from k2serve.cluster.local import LocalCluster
from k2serve.config import ModelConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPTS = [[5, 17, 300, 42, 9, 1000, 77, 3], list(range(200, 237)), [11, 12, 13]]
MAX_TOKENS = [6, 3, 9]


@pytest.fixture(scope="module")
def cluster(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = local_cluster_spec(
        tiny_ckpt, tmp_path_factory.mktemp("metrics"), use_redis=True
    )  # sessions' metrics
    with LocalCluster(spec) as c:
        yield c


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    r = httpx.get(url, timeout=10)
    r.raise_for_status()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of `name` over the samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


def test_worker_metrics_count_what_the_requests_did(cluster: LocalCluster, tiny_ckpt: Path) -> None:
    workers = {w["role"]: w for w in cluster.workers()}
    assert set(workers) == {"prefill", "decode"}
    for w in workers.values():
        assert w["metrics_url"].startswith("http://127.0.0.1:") and w["metrics_url"].endswith("/metrics")
    assert "/metrics" in cluster.status_table()
    client = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0)

    async def run() -> list[list[int]]:
        return await asyncio.gather(
            *(http_greedy(client, tiny_ckpt.name, p, m) for p, m in zip(PROMPTS, MAX_TOKENS, strict=True))
        )

    out = asyncio.run(run())
    assert [len(o) for o in out] == MAX_TOKENS
    n = len(PROMPTS)
    prefill = scrape(workers["prefill"]["metrics_url"])
    decode = scrape(workers["decode"]["metrics_url"])
    for side, role in ((prefill, "prefill"), (decode, "decode")):
        wid = workers[role]["worker_id"]
        labels = {"model_name": tiny_ckpt.name, "engine": wid, "role": role}
        assert total(side, "vllm:num_requests_running", **labels) == 0
        assert total(side, "vllm:request_success_total", finished_reason="length", **labels) == n
        assert total(side, "vllm:e2e_request_latency_seconds_count", **labels) == n
    # the prompt is computed on the prefill side only, each generated token is counted once
    assert total(prefill, "vllm:prompt_tokens_total") == sum(map(len, PROMPTS))
    assert total(decode, "vllm:prompt_tokens_total") == 0
    assert total(prefill, "vllm:generation_tokens_total") == n  # the first token of each
    assert total(decode, "vllm:generation_tokens_total") == sum(MAX_TOKENS) - n
    assert total(prefill, "vllm:time_to_first_token_seconds_count") == n
    assert total(decode, "vllm:time_to_first_token_seconds_count") == 0
    assert total(decode, "vllm:inter_token_latency_seconds_count") == sum(MAX_TOKENS) - n
    assert total(prefill, "vllm:prefix_cache_queries_total") >= sum(map(len, PROMPTS))
    # both sides of the KV transfer saw the same bytes: 576 latent values per token per layer
    cfg = ModelConfig.from_file(tiny_ckpt)
    kv_bytes = sum(map(len, PROMPTS)) * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert total(prefill, "k2serve_kv_transfer_bytes_total", backend="torch") == kv_bytes
    assert total(decode, "k2serve_kv_transfer_bytes_total", backend="torch") == kv_bytes
    assert total(prefill, "k2serve_kv_transfer_seconds_count") == n
    assert total(decode, "k2serve_kv_transfer_failures_total") == 0
    router = scrape(f"{cluster.http_url}/metrics")
    assert total(router, "k2serve_workers", role="prefill", state="ready") == 1
    assert total(router, "k2serve_workers", role="decode", state="ready") == 1
    assert total(router, "k2serve_admission_rejections_total") == 0


def test_every_metric_the_dashboard_and_alerts_query_is_exported(
    cluster: LocalCluster, tiny_ckpt: Path
) -> None:
    """Names and selector labels of every PromQL expression in the chart's dashboard and rules, against
    the router's and the workers' scrapes after a request (EP-only names: tests/test_ep_cluster.py)."""
    client = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0)
    client.completions.create(model=tiny_ckpt.name, prompt=PROMPTS[0], max_tokens=2, temperature=0)
    exported: dict[str, set[str]] = {}  # sample name -> its label names
    urls = [f"{cluster.http_url}/metrics", *(w["metrics_url"] for w in cluster.workers())]
    for url in urls:
        for name, labels in scrape(url):
            exported.setdefault(name, set()).update(k for k, _ in labels)
    exprs, recorded = expressions()
    queried = set().union(*map(metric_names, exprs)) - recorded
    missing = {n for n in queried - set(exported) if not n.startswith("k2serve_ep_")}
    assert not missing, f"queried but exported by no process: {sorted(missing)}"
    assert len(queried) > 20
    for expr in exprs:
        for name, labels in selector_labels(expr).items():
            if name in exported:
                unknown = labels - exported[name] - TARGET_LABELS
                assert not unknown, f"{name} has no label {sorted(unknown)} (in {expr})"
    # the SLO rule's bucket bound is one the router's TTFT histogram has
    bounds = {
        dict(lbl)["le"] for n, lbl in scrape(urls[0]) if n == "k2serve_time_to_first_token_seconds_bucket"
    }
    assert "2.5" in bounds
