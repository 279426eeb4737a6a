"""The chart's monitoring objects, rendered: the PodMonitor scrapes the port the worker pods name
`metrics` and pass as --metrics-port; the dashboard ConfigMap carries Grafana's sidecar label and a
dashboard whose every panel queries through the datasource variable; the PrometheusRule's alerts and
SLO thresholds follow the values, on a bucket bound the router's TTFT histogram has. (That every name
they query is exported: tests/test_metrics_cluster.py.) Also the PromQL parsing those tests rely on."""

from __future__ import annotations

import json
from typing import Any

from monitoring_queries import MONITORING, metric_names, selector_labels
from test_helm_chart import CHART_DIR, TLS_SECRET, render

from k2serve.api.metrics import _LATENCY_BUCKETS
from k2serve.cli.parser import build_parser


def kinds(values: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for _, obj in render(values):
        out.setdefault(obj["kind"], []).append(obj)
    return out


def test_off_by_default() -> None:
    objs = kinds({})
    assert not {"PodMonitor", "PrometheusRule", "ServiceMonitor"} & set(objs)
    assert not [c for c in objs["ConfigMap"] if c["metadata"]["name"].endswith("-dashboard")]


def test_pod_monitor_scrapes_the_workers_metrics_port() -> None:
    objs = kinds(MONITORING)
    (pm,) = objs["PodMonitor"]
    assert pm["spec"]["selector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/component", "operator": "In", "values": ["prefill", "decode"]}
    ]
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics" and "scheme" not in endpoint
    parser = build_parser()
    for sts in objs["StatefulSet"]:
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        role = sts["metadata"]["labels"]["app.kubernetes.io/component"]
        if role not in ("prefill", "decode"):
            continue
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
        args = parser.parse_args(container["args"])
        assert args.metrics_port == port != args.port
    (tls_pm,) = kinds({**MONITORING, "tls": {"enabled": True, "existingSecret": TLS_SECRET}})["PodMonitor"]
    assert tls_pm["spec"]["podMetricsEndpoints"][0]["scheme"] == "https"


def test_dashboard_config_map() -> None:
    (cm,) = [c for c in kinds(MONITORING)["ConfigMap"] if c["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["k2serve.json"])
    assert dash == json.loads((CHART_DIR / "dashboards" / "k2serve.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 15 and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert metric_names(t["expr"]), t["expr"]
    titles = " ".join(p["title"] for p in panels)
    for topic in (
        "TTFT",
        "Inter-token",
        "End-to-end",
        "tokens / s",
        "KV-cache usage",
        "Prefix",
        "KV transfer",
        "EP",
    ):
        assert topic in titles, topic


def test_prometheus_rule_follows_the_values() -> None:
    values = {
        "monitoring": {"prometheusRule": {"enabled": True, "ttftSloSeconds": "1.0", "ttftSloTarget": 0.995}}
    }
    (rule,) = kinds(values)["PrometheusRule"]
    rules = {r.get("alert") or r["record"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "K2ServeNoWorkerReady",
        "K2ServeKVTransferFailures",
        "K2ServeTTFTSLOFastBurn",
        "K2ServeTTFTSLOSlowBurn",
    } <= set(rules)
    assert 'le="1.0"' in rules["k2serve:ttft_slo_errors:ratio_rate5m"]["expr"]
    assert 'namespace="llm"' in rules["K2ServeNoWorkerReady"]["expr"]
    assert rules["K2ServeTTFTSLOFastBurn"]["expr"].count("> 0.072") == 2  # 14.4 x the 0.005 budget
    assert rules["K2ServeTTFTSLOSlowBurn"]["expr"].count("> 0.03") == 2
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    allowed = schema["properties"]["monitoring"]["properties"]["prometheusRule"]["properties"][
        "ttftSloSeconds"
    ]["enum"]
    assert set(allowed) <= {str(b) for b in _LATENCY_BUCKETS}  # each one an `le` the router exports


def test_promql_parsing() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, role) (rate(vllm:ttft_bucket{namespace="$ns", role=~"a|b"}'
        "[$__rate_interval]))) / on (role) group_left sum(x_total) > 0.5 and label_values(m_y, ns)"
    )
    assert metric_names(expr) == {"vllm:ttft_bucket", "x_total", "m_y"}
    assert selector_labels(expr) == {"vllm:ttft_bucket": {"namespace", "role"}}
