"""Every rendered object, loaded into the `kubernetes` client's models, and the properties the
deployment relies on: non-root read-only pods, gRPC probes, secrets only by reference, network
isolation, disruption budgets, autoscaling targets, GPUs, Redis persistence.

CRDs (ScaledObject, ServiceMonitor) have no client model: they are checked by structure.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
from kubernetes.client import ApiClient
from test_helm_chart import (
    API_KEY_SECRET,
    TLS_SECRET,
    VALUE_SETS,
    by_name,
    objects,
    render,
)

API = ApiClient()
CRDS = {"ScaledObject", "ServiceMonitor"}
FULL = "k2-k2serve"


class _Response:
    """The one attribute ApiClient.deserialize reads from an HTTP response (client < 35)."""

    def __init__(self, obj: dict[str, Any]) -> None:
        self.data = json.dumps(obj)


def _deserialize(obj: dict[str, Any], model: str) -> Any:
    if (
        "response_text" in inspect.signature(API.deserialize).parameters
    ):  # client >= 35: (text, type, content_type)
        return API.deserialize(json.dumps(obj), model, "application/json")
    return API.deserialize(_Response(obj), model)


def to_model(obj: dict[str, Any], model: str | None = None) -> Any:
    """The client model of a built-in object; its serialisation must give the object back, so a
    misspelt or misplaced field (silently dropped by the model) fails here."""
    if model is None:
        version = obj["apiVersion"].rsplit("/", 1)[-1]
        model = version[0].upper() + version[1:] + obj["kind"]
    loaded = _deserialize(obj, model)
    assert API.sanitize_for_serialization(loaded) == obj, (
        f"{obj['kind']} {obj['metadata']['name']} lost fields"
    )
    return loaded


def pod_specs(values: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(owner kind/name, pod spec) of every pod template."""
    return [
        (f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
        for o in objects(values)
        if o["kind"] in ("Deployment", "StatefulSet")
    ]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_loads_into_client_models(name: str) -> None:
    for path, obj in render(VALUE_SETS[name]):
        if obj["kind"] in CRDS:
            continue
        assert to_model(obj) is not None, path


def test_ep_groups_are_statefulsets_of_size_times_groups() -> None:
    values = VALUE_SETS["ep-groups"]
    for role, groups, size, port in (("prefill", 2, 4, 50062), ("decode", 3, 8, 29500)):
        sts = by_name(values, "StatefulSet", f"{FULL}-{role}")["spec"]
        assert sts["replicas"] == groups * size
        assert sts["podManagementPolicy"] == "Parallel"  # a group's ranks start together
        (c,) = sts["template"]["spec"]["containers"]
        assert {"name": "ep", "containerPort": port, "protocol": "TCP"} in c["ports"]
        svc = by_name(values, "Service", f"{FULL}-{role}-headless")["spec"]
        assert {"name": "ep", "port": port, "targetPort": "ep"} in svc["ports"]
        assert svc["publishNotReadyAddresses"] is True  # rank 0 is reachable before it is ready
    plain = by_name(VALUE_SETS["defaults"], "StatefulSet", f"{FULL}-decode")["spec"]
    assert plain["replicas"] == 1
    assert plain["template"]["spec"]["containers"][0]["command"] == ["k2serve"]
    assert "ep" not in {p["name"] for p in plain["template"]["spec"]["containers"][0]["ports"]}


def test_scaledobject_structure() -> None:
    values = VALUE_SETS["keda-external-redis"]
    sos = objects(values, "ScaledObject")
    assert {o["metadata"]["name"] for o in sos} == {f"{FULL}-router", f"{FULL}-prefill", f"{FULL}-decode"}
    assert objects(values, "HorizontalPodAutoscaler") == []
    for so in sos:
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        spec = so["spec"]
        assert set(spec) == {
            "scaleTargetRef",
            "minReplicaCount",
            "maxReplicaCount",
            "pollingInterval",
            "cooldownPeriod",
            "triggers",
        }
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        for trig in spec["triggers"]:
            assert trig["type"] == "prometheus"
            meta = trig["metadata"]
            assert set(meta) == {"serverAddress", "query", "threshold"}
            assert all(isinstance(v, str) for v in meta.values())  # KEDA metadata is a string map
            assert "k2serve_" in meta["query"]
    prefill = by_name(values, "ScaledObject", f"{FULL}-prefill")
    assert prefill["spec"]["triggers"][0]["authenticationRef"] == {"name": "prom-auth"}


def test_servicemonitor_structure() -> None:
    values = VALUE_SETS["monitoring"]
    (sm,) = objects(values, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    router_svc = by_name(values, "Service", f"{FULL}-router")
    assert sm["spec"]["selector"]["matchLabels"].items() <= router_svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in router_svc["spec"]["ports"]}
    assert ep["path"] == "/metrics" and ep["scheme"] == "https"
    assert objects(VALUE_SETS["defaults"], "ServiceMonitor") == []


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pods_are_non_root_and_read_only(name: str) -> None:
    for owner, spec in pod_specs(VALUE_SETS[name]):
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, owner
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, owner
        # only the planner calls the Kubernetes API (tests/test_helm_planner.py checks its Role)
        assert spec["automountServiceAccountToken"] is owner.endswith("-planner"), owner
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (owner, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (owner, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (owner, c["name"])
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, (owner, c["name"])
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, (owner, c["name"])
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        assert "tmp" in empty_dirs, owner


@pytest.mark.parametrize("name", VALUE_SETS)
def test_k2serve_probes_use_grpc_health(name: str) -> None:
    values = VALUE_SETS[name]
    tls = bool(values.get("tls", {}).get("enabled"))
    for owner, spec in pod_specs(values):
        for c in spec["containers"]:
            if "k2serve" not in c["command"] or c["name"] == "planner":  # the planner serves no port
                continue
            grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
            if c["name"] == "router":  # liveness: the process serves; readiness: it can serve a request
                scheme = "HTTPS" if tls else "HTTP"
                for probe, path in (
                    ("startupProbe", "/health/live"),
                    ("livenessProbe", "/health/live"),
                    ("readinessProbe", "/health/ready"),
                ):
                    assert c[probe]["httpGet"] == {"path": path, "port": "http", "scheme": scheme}, probe
            else:  # workers: the gRPC health service, or with TLS (every hop) a TCP check of that port
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    want = {"tcpSocket": {"port": grpc_port}} if tls else {"grpc": {"port": grpc_port}}
                    got = {k: v for k, v in c[probe].items() if k in ("tcpSocket", "grpc")}
                    assert got == want, (owner, probe)
                assert ("--tls-cert" in c["args"]) == bool(tls), owner


SECRETISH = ("KEY", "SECRET", "PASSWORD", "TOKEN", "REDIS_URL", "AUTH")


@pytest.mark.parametrize("name", VALUE_SETS)
def test_no_secret_in_plain_env_or_args(name: str) -> None:
    values = VALUE_SETS[name]
    generated = [o for o in objects(values, "Secret")]
    generated_values = [v for s in generated for v in s.get("data", {}).values()]
    for owner, spec in pod_specs(values):
        for c in containers(spec):
            for e in c.get("env", []):
                if any(w in e["name"] for w in SECRETISH):
                    assert "value" not in e and set(e["valueFrom"]) == {"secretKeyRef"}, (owner, e)
            text = json.dumps(c)
            for v in generated_values:
                assert v not in text, f"{owner}: a generated secret value leaked into {c['name']}"
            assert "--api-key" not in c.get("args", []), owner
    for cm in objects(values, "ConfigMap"):
        assert not any(w in k.upper() for k in cm["data"] for w in SECRETISH), cm["data"]


def _env(values: dict[str, Any], deployment: str, container: str) -> dict[str, dict[str, Any]]:
    spec = by_name(values, "Deployment", deployment)["spec"]["template"]["spec"]
    c = next(c for c in spec["containers"] if c["name"] == container)
    return {e["name"]: e for e in c.get("env", [])}


def test_api_key_and_tls_come_from_secrets() -> None:
    values = VALUE_SETS["tls-apikey-secrets"]
    env = _env(values, f"{FULL}-router", "router")
    assert env["K2SERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": API_KEY_SECRET, "key": "key"}
    spec = by_name(values, "Deployment", f"{FULL}-router")["spec"]["template"]["spec"]
    (tls,) = [v for v in spec["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == TLS_SECRET
    assert {i["path"] for i in tls["secret"]["items"]} == {"tls.crt", "tls.key"}
    assert "K2SERVE_API_KEY" not in _env(VALUE_SETS["defaults"], f"{FULL}-router", "router")


@pytest.mark.parametrize("name", VALUE_SETS)
def test_network_policies_isolate_workers_and_redis(name: str) -> None:
    values = VALUE_SETS[name]
    nps = {o["metadata"]["name"]: o["spec"] for o in objects(values, "NetworkPolicy")}
    if not values.get("networkPolicy", {}).get("enabled", True):
        assert nps == {}
        return
    release = {"app.kubernetes.io/name": "k2serve", "app.kubernetes.io/instance": "k2"}
    for role in ("prefill", "decode"):
        np = nps[f"{FULL}-{role}"]
        assert np["podSelector"]["matchLabels"] == {**release, "app.kubernetes.io/component": role}
        rule, metrics = np["ingress"]
        # the metrics port alone, from monitoring.allowFrom (anyone when empty, as in every value set)
        assert metrics == {"ports": [{"port": "metrics", "protocol": "TCP"}]}
        (peer,) = rule["from"]
        assert set(peer) == {"podSelector"}  # same namespace, this release only
        assert peer["podSelector"]["matchLabels"] == release
        (expr,) = peer["podSelector"]["matchExpressions"]
        assert expr["key"] == "app.kubernetes.io/component" and set(expr["values"]) == {
            "router",
            "prefill",
            "decode",
        }
    router = nps[f"{FULL}-router"]
    internal, public = router["ingress"]
    # The internal listener (worker registry): this release's workers only.
    assert internal["ports"] == [{"port": "internal", "protocol": "TCP"}]
    (peer,) = internal["from"]
    assert set(peer) == {"podSelector"} and peer["podSelector"]["matchLabels"] == release
    assert set(peer["podSelector"]["matchExpressions"][0]["values"]) == {"prefill", "decode"}
    # The public ports: router.allowFrom (absent: anyone).
    assert [p["port"] for p in public["ports"]] == ["http", "grpc"]
    assert public.get("from") == (values.get("router", {}).get("allowFrom") or None)
    if values.get("redis", {}).get("enabled", True):
        redis = nps[f"{FULL}-redis"]
        (rule,) = redis["ingress"]
        assert rule["from"] == [
            {"podSelector": {"matchLabels": {**release, "app.kubernetes.io/component": "router"}}}
        ]
        assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    else:
        assert f"{FULL}-redis" not in nps
