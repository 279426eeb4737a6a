"""The Helm chart through the embedded Helm library (helm-python-sdk, Helm v4 as a shared library):
render and lint over several value sets, the values schema, and the chart's layout.

The other tests/test_helm_*.py import `render`, `VALUE_SETS` and `CHART_DIR` from here. No
Kubernetes API server is involved: rendering is offline (`lookup` returns nothing).
"""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "helm" / "k2serve"
RELEASE, NAMESPACE = "k2", "llm"

# Secret names the value sets refer to; the chart must only ever name them, never read them.
TLS_SECRET, API_KEY_SECRET, REDIS_SECRET, REDIS_URL_SECRET, CLUSTER_TOKEN_SECRET = (
    "k2-tls",
    "k2-api-keys",
    "k2-redis-auth",
    "k2-redis-url",
    "k2-cluster-token",
)

_PVC = {"persistentVolumeClaim": {"claimName": "k2-weights", "readOnly": True}}
_GPU_MODEL = {"preset": "", "path": "/models/Kimi-K2-Instruct", "volume": _PVC, "dtype": "bfloat16"}
_HPA = {"autoscaling": {"enabled": True, "engine": "hpa", "minReplicas": 2, "maxReplicas": 6}}
_KEDA = {"autoscaling": {"enabled": True, "engine": "keda"}}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gpu-hpa": {
        "gpu": {"enabled": True},
        "model": _GPU_MODEL,
        "engine": {
            "maxModelLen": 131072,
            "kvCacheMb": 1000000,
            "prefixCaching": False,
            "kvOffloadHostMb": 2048,
            "kvOffloadDir": "/kv-tier",
            "kvOffloadDiskMb": 8192,
            "kvSessionLeaseS": 30,
            "kvOffloadAsync": False,
            "kvReloadTimeoutS": 3,
        },
        "router": {**_HPA, "replicas": 1},
        "prefill": {**_HPA, "transfer": {"backend": "torch"}},
        "decode": {**_HPA, "transfer": {"backend": "torch"}},
    },
    "keda-external-redis": {
        "redis": {"enabled": False, "external": {"urlSecretRef": {"name": REDIS_URL_SECRET, "key": "url"}}},
        "router": _KEDA,
        "prefill": {
            "autoscaling": {"enabled": True, "engine": "keda", "keda": {"authenticationRef": "prom-auth"}}
        },
        "decode": _KEDA,
    },
    "ep-groups": {
        "gpu": {"enabled": True},
        "model": _GPU_MODEL,
        "prefill": {"replicas": 2, "ep": {"size": 4}, "transfer": {"backend": "torch"}},
        "decode": {
            "replicas": 3,
            "ep": {
                "size": 8,
                "port": 29500,
                "timeoutSeconds": 900,
                "eplb": {"enabled": True, "windowSize": 500, "stepInterval": 2000, "numRedundantExperts": 16},
            },
        },
    },
    "tls-apikey-secrets": {
        "tls": {"enabled": True, "existingSecret": TLS_SECRET},
        "apiKey": {"existingSecret": API_KEY_SECRET, "key": "key"},
        "redis": {"auth": {"existingSecret": REDIS_SECRET, "key": "password"}},
        "clusterToken": {"existingSecret": CLUSTER_TOKEN_SECRET, "key": "token"},
        "model": {"servedModelName": "kimi-k2"},
    },
    "monitoring": {
        "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "router": {"allowFrom": [{"namespaceSelector": {"matchLabels": {"name": "gateway"}}}]},
        "tls": {"enabled": True, "existingSecret": TLS_SECRET},
    },
    "planner": {
        "planner": {
            "enabled": True,
            "prefill": {"maxReplicas": 6},
            "decode": {"minReplicas": 2},
            "extraArgs": ["--kv-high", "0.85"],
        },
        "tls": {"enabled": True, "existingSecret": TLS_SECRET, "caKey": "ca.crt"},
        "apiKey": {"existingSecret": API_KEY_SECRET, "key": "key"},
    },
    "minimal": {
        "redis": {"enabled": False},
        "networkPolicy": {"enabled": False},
        "router": {"pdb": {"enabled": False}},
        "prefill": {"pdb": {"enabled": False}},
        "decode": {"pdb": {"enabled": False}},
        "serviceAccount": {"create": False},
    },
    "kvstore": {  # the shared KV tier on the chart's own Mooncake Store master
        "kvStore": {"backend": "mooncake", "segmentMb": 2048, "putOnCompute": False},
    },
    "redis-tls": {  # mutual TLS everywhere, Redis over TLS with client certificates
        "tls": {"enabled": True, "existingSecret": TLS_SECRET, "caKey": "ca.crt"},
        "redis": {"tls": {"enabled": True}, "auth": {"existingSecret": REDIS_SECRET, "key": "password"}},
    },
}


@functools.cache
def _chart() -> Any:
    return helm.Chart.load(str(CHART_DIR))


def render_manifests(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` gives them (NOTES.txt included)."""
    return _chart().render(copy.deepcopy(values or {}), name=RELEASE, namespace=NAMESPACE, is_install=True)


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def _render_cached(key: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    out: list[tuple[str, dict[str, Any]]] = []
    for path, text in render_manifests(json.loads(key)).items():
        if not path.endswith("NOTES.txt"):
            out += [(path, doc) for doc in yaml.load_all(text, Loader=_Loader) if doc]
    return tuple(out)


def render(values: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(template path, object) of every rendered Kubernetes object; cached per value set (copies)."""
    return copy.deepcopy(list(_render_cached(json.dumps(values or {}, sort_keys=True))))


def objects(values: dict[str, Any] | None = None, kind: str | None = None) -> list[dict[str, Any]]:
    return [o for _, o in render(values) if kind is None or o["kind"] == kind]


def by_name(values: dict[str, Any] | None, kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects(values, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, got {len(found)}"
    return found[0]


def lint_errors(values: dict[str, Any] | None = None) -> list[str]:
    report = helm.lint(
        str(CHART_DIR), copy.deepcopy(values or {}), namespace=NAMESPACE, kube_version="v1.31.0"
    )
    return [m["error"] for m in report["messages"] if m["severity"] >= 3] + list(report["errors"])


# --- render and lint ------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_renders_and_lints_clean(name: str) -> None:
    assert render(VALUE_SETS[name]), "nothing rendered"
    assert lint_errors(VALUE_SETS[name]) == []


def test_lint_has_no_warnings_on_defaults() -> None:
    report = helm.lint(str(CHART_DIR), {}, strict=True, namespace=NAMESPACE)
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", VALUE_SETS)
def test_one_object_per_template(name: str) -> None:
    per_file: dict[str, int] = {}
    for path, _ in render(VALUE_SETS[name]):
        per_file[path] = per_file.get(path, 0) + 1
    assert {p: n for p, n in per_file.items() if n > 1} == {}


def test_templates_are_small() -> None:
    for f in (CHART_DIR / "templates").rglob("*"):
        if f.is_file():
            assert len(f.read_text().splitlines()) <= 300, f


def test_object_names_are_unique_per_kind() -> None:
    for name, values in VALUE_SETS.items():
        keys = [(o["kind"], o["metadata"]["name"]) for o in objects(values)]
        assert len(keys) == len(set(keys)), name


# --- the values schema ----------------------------------------------------------------------


def _schema() -> dict[str, Any]:
    return json.loads((CHART_DIR / "values.schema.json").read_text())


def test_schema_is_generated_from_values_yaml() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_values_schema.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_values_yaml_validates_against_schema() -> None:
    schema = _schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load((CHART_DIR / "values.yaml").read_text()))


@pytest.mark.parametrize("name", VALUE_SETS)
def test_value_sets_validate_against_schema(name: str) -> None:
    merged = _chart().merge_values(copy.deepcopy(VALUE_SETS[name]))
    jsonschema.Draft202012Validator(_schema()).validate(merged)


BAD_VALUES: dict[str, dict[str, Any]] = {
    "negative router replicas": {"router": {"replicas": -1}},
    "negative decode replicas": {"decode": {"replicas": -3}},
    "plain-text apiKey string": {"apiKey": "sk-live-123"},
    "plain-text apiKey value": {"apiKey": {"existingSecret": "k", "value": "sk-live-123"}},
    "plain-text redis password": {"redis": {"auth": {"password": "hunter2"}}},
    "plain-text tls key": {
        "tls": {"enabled": True, "existingSecret": "t", "key": "-----BEGIN PRIVATE KEY-----"}
    },
    "credential in env": {"env": {"K2SERVE_API_KEY": "sk-live-123"}},
    "tls without secret": {"tls": {"enabled": True}},
    "unknown transfer backend": {"prefill": {"transfer": {"backend": "rdma"}}},
    "port out of range": {"router": {"grpcPort": 70000}},
    "zero ep size": {"decode": {"ep": {"size": 0}}},
    "ep.podsPerGroup (removed: one pod per rank)": {"decode": {"ep": {"size": 4, "podsPerGroup": 2}}},
    "unknown autoscaling engine": {"prefill": {"autoscaling": {"engine": "vpa"}}},
    "neither preset nor path": {"model": {"preset": ""}},
    "both preset and path": {"model": {"preset": "tiny", "path": "/models/x"}},
    "unknown top-level key": {"replicaCount": 3},
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_values_are_rejected_by_template_and_lint(case: str) -> None:
    values = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError):
        render_manifests(values)
    assert lint_errors(values), f"helm lint accepted {case}"


TEMPLATE_FAILURES: dict[str, tuple[dict[str, Any], str]] = {
    "redis twice": ({"redis": {"external": {"urlSecretRef": {"name": "u"}}}}, "not both"),
    "autoscaled ep groups": (
        {"prefill": {"ep": {"size": 4}, "autoscaling": {"enabled": True}}},
        "would split expert-parallel groups",
    ),
    "ep port is the grpc port": (
        {"decode": {"ep": {"size": 2, "port": 50070}}},
        "already the worker's gRPC or transfer port",
    ),
    "ep port is the torch transfer port": (
        {"prefill": {"ep": {"size": 2, "port": 50061}, "transfer": {"backend": "torch"}}},
        "already the worker's gRPC or transfer port",
    ),
    "eplb without expert parallelism": (
        {"decode": {"ep": {"eplb": {"enabled": True}}}},
        "decode.ep.eplb.enabled needs decode.ep.size > 1",
    ),
    "eplb replicas not a multiple of the group": (
        {"prefill": {"ep": {"size": 4, "eplb": {"enabled": True, "numRedundantExperts": 6}}}},
        r"prefill.ep.eplb.numRedundantExperts \(6\) must be a multiple of prefill.ep.size \(4\)",
    ),
    "min above max": (
        {"decode": {"autoscaling": {"enabled": True, "minReplicas": 9, "maxReplicas": 2}}},
        "exceeds",
    ),
    "tls with the torch transfer backend": (
        {
            "tls": {"enabled": True, "existingSecret": TLS_SECRET},
            "decode": {"transfer": {"backend": "torch"}},
        },
        r"decode.transfer.backend torch with tls.enabled: .* set decode.transfer.backend to grpc, or "
        "tls.enabled to false",
    ),
}


@pytest.mark.parametrize("case", TEMPLATE_FAILURES)
def test_inconsistent_values_fail_the_render(case: str) -> None:
    values, message = TEMPLATE_FAILURES[case]
    with pytest.raises(helm.HelmError, match=message):
        render_manifests(values)
