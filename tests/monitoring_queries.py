"""What the chart's Grafana dashboard and PrometheusRule query: every PromQL expression they hold (rendered
through the embedded Helm library), and the metric names and selector labels in them. Used by the live
cluster tests, which check that a running cluster exports each name (and label) queried."""

from __future__ import annotations

import json
import re

from test_helm_chart import render

MONITORING = {
    "monitoring": {
        "grafanaDashboard": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "podMonitor": {"enabled": True},
        "serviceMonitor": {"enabled": True},
    }
}
# Labels Prometheus adds when it scrapes (not exported by the processes themselves).
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "container", "endpoint"}
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
}
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def expressions() -> tuple[list[str], set[str]]:
    """(every PromQL expression of the dashboard's panels and variables and of the rules, the names
    the rules record)."""
    objs = [obj for _, obj in render(MONITORING)]
    dashboards = [
        o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")
    ]
    rules = [o for o in objs if o["kind"] == "PrometheusRule"]
    assert len(dashboards) == 1 and len(rules) == 1
    dash = json.loads(dashboards[0]["data"]["k2serve.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    recorded: set[str] = set()
    for group in rules[0]["spec"]["groups"]:
        for rule in group["rules"]:
            exprs.append(rule["expr"])
            if "record" in rule:
                recorded.add(rule["record"])
    return exprs, recorded


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label_values(m, label) reads m)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"label_values\(\s*([^,{)]+)[^)]*\)", r"\1", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in _NAME.finditer(expr):
        rest = expr[m.end() :].lstrip()
        if rest.startswith("(") or m.group() in _KEYWORDS or expr[m.start() - 1 : m.start()] == "$":
            continue
        names.add(m.group())
    return names


def selector_labels(expr: str) -> dict[str, set[str]]:
    """metric name -> the labels its selectors match on (`m{a="x", b=~"y"}` -> {m: {a, b}})."""
    out: dict[str, set[str]] = {}
    for name, matchers in _SELECTOR.findall(re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)):
        out.setdefault(name, set()).update(_MATCHER.findall(matchers))
    return out
