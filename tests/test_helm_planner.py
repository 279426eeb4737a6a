"""The planner in the chart: its Deployment runs `k2serve planner --connector kubernetes` on this
release's StatefulSets, and its Role grants exactly what the Kubernetes connector calls (least
privilege). The Role is checked by authorizing every request the real `kubernetes` client makes,
against the stand-in API server of test_planner_connectors (not a real Kubernetes), the way the API
server's RBAC authorizer would: each request allowed, and every permission granted used."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest
from kubernetes import client
from test_helm_chart import (
    API_KEY_SECRET,
    NAMESPACE,
    TLS_SECRET,
    VALUE_SETS,
    by_name,
    render,
    render_manifests,
)
from test_helm_objects import FULL, pod_specs
from test_planner_connectors import StandInAPIServer

from k2serve.cli import build_parser
from k2serve.planner.kube import KubernetesConnector

VALUES = VALUE_SETS["planner"]
PLANNER = f"{FULL}-planner"
STATEFULSETS = {"prefill": f"{FULL}-prefill", "decode": f"{FULL}-decode"}


def _request_attributes(method: str, path: str) -> tuple[str, str, str, str]:
    """(apiGroup, resource[/subresource], verb, name) of a namespaced request, as RBAC sees it."""
    parts = path.split("?")[0].strip("/").split("/")
    assert parts[0] == "apis" and parts[3] == "namespaces" and parts[4] == NAMESPACE, path
    group, resource, name, sub = parts[1], parts[5], parts[6], parts[7:]
    verb = {"GET": "get", "PATCH": "patch", "PUT": "update", "DELETE": "delete", "POST": "create"}[method]
    return group, "/".join([resource, *sub]), verb, name


def _granted(role: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    """Every (apiGroup, resource, verb, name) a Role's rules allow (each rule names its resources)."""
    out = set()
    for rule in role["rules"]:
        assert rule.get("resourceNames"), f"rule {rule} is not limited to named objects"
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    out |= {(g, r, v, n) for n in rule["resourceNames"]}
    return out


def test_role_grants_exactly_what_the_connector_calls() -> None:
    role = by_name(VALUES, "Role", PLANNER)
    server = StandInAPIServer({STATEFULSETS["prefill"]: 1, STATEFULSETS["decode"]: 1})
    api = client.AppsV1Api(client.ApiClient(client.Configuration(host=server.url)))
    connector = KubernetesConnector(api, NAMESPACE, STATEFULSETS, request_timeout_s=5)
    try:
        for role_name in ("prefill", "decode"):  # everything the planner loop calls: read and scale
            connector.replicas(role_name)
            connector.scale(role_name, 2)
    finally:
        connector.close()
        server.close()
    requested = {_request_attributes(r["method"], r["path"]) for r in server.requests}
    granted = _granted(role)
    assert requested - granted == set(), "the connector makes calls its Role forbids"
    assert granted - requested == set(), "the Role grants more than the connector uses"


def test_planner_pod_runs_the_kubernetes_connector_on_this_release() -> None:
    specs = dict(pod_specs(VALUES))
    spec = specs[f"Deployment/{PLANNER}"]
    assert spec["serviceAccountName"] == PLANNER and spec["automountServiceAccountToken"] is True
    others = [owner for owner, s in specs.items() if owner != f"Deployment/{PLANNER}"]
    assert others and all(specs[o]["automountServiceAccountToken"] is False for o in others)
    binding = by_name(VALUES, "RoleBinding", PLANNER)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": PLANNER}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": PLANNER, "namespace": NAMESPACE}]
    by_name(VALUES, "ServiceAccount", PLANNER)

    (container,) = spec["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.connector == "kubernetes" and args.namespace == NAMESPACE
    for role_name, sts in STATEFULSETS.items():
        by_name(VALUES, "StatefulSet", sts)
        assert getattr(args, f"statefulset_{role_name}") == sts
    router = by_name(VALUES, "Service", f"{FULL}-router")
    http_port = next(p["port"] for p in router["spec"]["ports"] if p["name"] == "http")
    assert args.router == f"https://{FULL}-router.{NAMESPACE}.svc:{http_port}"  # the value set has TLS on
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert args.router_ca is not None and args.router_ca.rsplit("/", 1)[0] in mounts
    planner_values = VALUES["planner"]
    assert (args.max_prefill, args.min_decode, args.kv_high) == (
        planner_values["prefill"]["maxReplicas"],
        planner_values["decode"]["minReplicas"],
        0.85,
    )
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["K2SERVE_API_KEY"]["name"] == API_KEY_SECRET


def test_no_planner_objects_by_default() -> None:
    assert [path for path, _ in render({}) if "/planner/" in path] == []


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"prefill": {"autoscaling": {"enabled": True}}}, "the planner and the autoscaler would both set"),
        ({"decode": {"minReplicas": 5, "maxReplicas": 2}}, "planner.decode: minReplicas .5. exceeds"),
        ({"tls": {"enabled": True, "existingSecret": TLS_SECRET}}, "needs tls.caKey"),
    ],
)
def test_inconsistent_planner_values_fail_the_render(values: dict[str, Any], message: str) -> None:
    planner = {"enabled": True, **{k: v for k, v in values.items() if k == "decode"}}
    rest = {k: v for k, v in values.items() if k != "decode"}
    with pytest.raises(helm.HelmError, match=message):
        render_manifests({"planner": planner, **rest})
