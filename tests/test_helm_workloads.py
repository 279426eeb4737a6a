"""How the rendered workloads fit together: disruption budgets and autoscalers point at real
workloads, GPUs follow expert parallelism, Services reach named ports, Redis persists with AOF."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
import yaml
from test_helm_chart import (
    CLUSTER_TOKEN_SECRET,
    REDIS_SECRET,
    REDIS_URL_SECRET,
    ROOT,
    TLS_SECRET,
    VALUE_SETS,
    by_name,
    objects,
    render_manifests,
)
from test_helm_objects import FULL, pod_specs

WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def workloads(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects(values) if o["kind"] in WORKLOAD_KINDS}


def pod_labels(workload: dict[str, Any]) -> list[dict[str, str]]:
    return [workload["spec"]["template"]["metadata"]["labels"]]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pdbs_cover_router_and_workers(name: str) -> None:
    values = VALUE_SETS[name]
    pdbs = {o["metadata"]["name"]: o["spec"] for o in objects(values, "PodDisruptionBudget")}
    wl = workloads(values)
    for role in ("router", "prefill", "decode"):
        enabled = values.get(role, {}).get("pdb", {}).get("enabled", True)
        assert (f"{FULL}-{role}" in pdbs) == enabled
        if enabled:
            pdb = pdbs[f"{FULL}-{role}"]
            assert pdb["maxUnavailable"] >= 1
            sel = pdb["selector"]["matchLabels"]
            assert all(selects(sel, labels) for labels in pod_labels(wl[f"{FULL}-{role}"]))
            others = [w for n, w in wl.items() if n != f"{FULL}-{role}"]
            assert not any(selects(sel, labels) for w in others for labels in pod_labels(w))


@pytest.mark.parametrize("name", ["gpu-hpa", "keda-external-redis"])
def test_autoscalers_target_the_role_workload(name: str) -> None:
    values = VALUE_SETS[name]
    wl = workloads(values)
    scalers = objects(values, "HorizontalPodAutoscaler") + objects(values, "ScaledObject")
    assert scalers
    for s in scalers:
        ref = s["spec"]["scaleTargetRef"]
        target = wl[ref["name"]]
        assert (ref["apiVersion"], ref["kind"]) == (target["apiVersion"], target["kind"])
        assert ref["name"] == s["metadata"]["name"]  # the autoscaler of a role scales that role
        assert "replicas" not in target["spec"], (
            "an autoscaled workload must leave replicas to the autoscaler"
        )


def test_hpa_reads_router_metrics() -> None:
    values = VALUE_SETS["gpu-hpa"]
    hpa = by_name(values, "HorizontalPodAutoscaler", f"{FULL}-prefill")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    (metric,) = hpa["metrics"]
    assert metric["type"] == "External" and metric["external"]["target"]["type"] == "AverageValue"
    assert metric["external"]["metric"]["name"] == "k2serve_requests_waiting"


def _package_source() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "k2serve").rglob("*.py"))


def test_autoscaling_metrics_are_ones_k2serve_exports() -> None:
    """The metric names the default HPA metrics and KEDA queries read are defined in k2serve."""
    values = yaml.safe_load((ROOT / "helm" / "k2serve" / "values.yaml").read_text())
    names = set()
    for role in ("router", "prefill", "decode"):
        auto = values[role]["autoscaling"]
        names |= {m["external"]["metric"]["name"] for m in auto["metrics"] if m["type"] == "External"}
        names |= {n.removesuffix("_bucket") for n in re.findall(r"k2serve_\w+", auto["keda"]["query"])}
    assert names
    source = _package_source()
    assert {n for n in names if f'"{n}"' not in source} == set()


def _gpu(spec: dict[str, Any]) -> tuple[str | None, str | None]:
    res = spec["containers"][0]["resources"]
    return res.get("requests", {}).get("nvidia.com/gpu"), res.get("limits", {}).get("nvidia.com/gpu")


def test_every_worker_pod_takes_one_gpu() -> None:
    """One process per worker pod, one EP rank per process: one GPU, whatever ep.size is."""
    for name in ("gpu-hpa", "ep-groups"):
        specs = dict(pod_specs(VALUE_SETS[name]))
        for role in ("prefill", "decode"):
            assert _gpu(specs[f"StatefulSet/{FULL}-{role}"]) == ("1", "1"), (name, role)
        assert _gpu(specs[f"Deployment/{FULL}-router"]) == (None, None)
    tolerations = dict(pod_specs(VALUE_SETS["ep-groups"]))[f"StatefulSet/{FULL}-decode"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    for owner, spec in pod_specs(VALUE_SETS["defaults"]):
        assert _gpu(spec) == (None, None), owner
        assert "tolerations" not in spec, owner


def test_image_variant_follows_gpu() -> None:
    gpu = dict(pod_specs(VALUE_SETS["gpu-hpa"]))
    assert gpu[f"StatefulSet/{FULL}-decode"]["containers"][0]["image"].endswith(":0.1.0-cuda")
    assert gpu[f"Deployment/{FULL}-router"]["containers"][0]["image"].endswith(":0.1.0-cpu")
    for owner, spec in pod_specs(VALUE_SETS["defaults"]):
        if "redis" not in owner:
            assert all(c["image"].endswith(":0.1.0-cpu") for c in spec["containers"]), owner


@pytest.mark.parametrize("name", VALUE_SETS)
def test_services_reach_named_container_ports(name: str) -> None:
    values = VALUE_SETS[name]
    wl = workloads(values)
    for svc in objects(values, "Service"):
        matched = [
            w for w in wl.values() if all(selects(svc["spec"]["selector"], lab) for lab in pod_labels(w))
        ]
        assert matched, svc["metadata"]["name"]
        for w in matched:
            specs = [s for o, s in pod_specs(values) if o.split("/")[1] == w["metadata"]["name"]]
            names = {p["name"] for s in specs for c in s["containers"] for p in c.get("ports", [])}
            for port in svc["spec"]["ports"]:
                assert port["targetPort"] in names, (svc["metadata"]["name"], port)


def test_router_service_exposes_http_and_grpc() -> None:
    svc = by_name(VALUE_SETS["defaults"], "Service", f"{FULL}-router")["spec"]
    assert {(p["name"], p["port"]) for p in svc["ports"]} == {
        ("http", 8000),
        ("grpc", 50051),
        ("internal", 50052),
    }
    assert svc["type"] == "ClusterIP"


def test_worker_statefulsets_use_their_headless_service() -> None:
    values = VALUE_SETS["gpu-hpa"]
    for role in ("prefill", "decode"):
        sts = by_name(values, "StatefulSet", f"{FULL}-{role}")
        svc = by_name(values, "Service", f"{FULL}-{role}-headless")["spec"]
        assert sts["spec"]["serviceName"] == f"{FULL}-{role}-headless"
        assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
        assert {p["name"] for p in svc["ports"]} == {"grpc", "transfer"}  # torch transfer backend


def _redis_container(values: dict[str, Any]) -> dict[str, Any]:
    return by_name(values, "StatefulSet", f"{FULL}-redis")["spec"]["template"]["spec"]["containers"][0]


def test_redis_persists_with_aof_and_secret_password() -> None:
    values = VALUE_SETS["defaults"]
    sts = by_name(values, "StatefulSet", f"{FULL}-redis")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    c = _redis_container(values)
    script = " ".join(c["command"] + c["args"])
    assert "--appendonly yes" in script and "--appendfsync everysec" in script and "--dir /data" in script
    assert '--requirepass "$REDIS_PASSWORD"' in script
    env = {e["name"]: e for e in c["env"]}
    ref = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": f"{FULL}-redis-auth", "key": "redis-password"}
    secret = by_name(values, "Secret", f"{FULL}-redis-auth")
    assert set(secret["data"]) == {"redis-password"}
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/data", "/tmp"}


def test_redis_with_existing_secret_creates_none() -> None:
    values = VALUE_SETS["tls-apikey-secrets"]
    assert objects(values, "Secret") == []
    c = _redis_container(values)
    env = {e["name"]: e for e in c["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": REDIS_SECRET, "key": "password"}


def _router_env(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = by_name(values, "Deployment", f"{FULL}-router")["spec"]["template"]["spec"]
    return {e["name"]: e for e in spec["containers"][0]["env"]}


def _router(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The router's pod spec and its container."""
    spec = by_name(values, "Deployment", f"{FULL}-router")["spec"]["template"]["spec"]
    return spec, spec["containers"][0]


def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_router_redis_password_is_a_mounted_secret_file() -> None:
    """The chart's Redis: the router dials it by a plain URL and reads the password from the Secret,
    mounted as a file (--redis-password-file): not in its args, not in its environment."""
    spec, c = _router(VALUE_SETS["defaults"])
    assert _flag(c["args"], "--redis-url") == f"redis://{FULL}-redis.llm.svc:6379/0"
    path = _flag(c["args"], "--redis-password-file")
    (vol,) = [v for v in spec["volumes"] if v["name"] == "redis-auth"]
    assert vol["secret"]["secretName"] == f"{FULL}-redis-auth"
    assert vol["secret"]["items"] == [{"key": "redis-password", "path": "password"}]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "redis-auth"]
    assert path == f"{mount['mountPath']}/password" and mount["readOnly"] is True
    assert not [e for e in c["env"] if e["name"].startswith("REDIS")]
    spec, _ = _router(VALUE_SETS["tls-apikey-secrets"])  # an existing Secret, its own key
    (vol,) = [v for v in spec["volumes"] if v["name"] == "redis-auth"]
    assert vol["secret"]["secretName"] == REDIS_SECRET
    assert vol["secret"]["items"] == [{"key": "password", "path": "password"}]
    external = _router_env(VALUE_SETS["keda-external-redis"])
    assert external["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": REDIS_URL_SECRET, "key": "url"}
    spec, c = _router(VALUE_SETS["keda-external-redis"])
    assert "--redis-url" not in c["args"] and "redis-auth" not in {v["name"] for v in spec["volumes"]}
    assert f"{FULL}-redis" not in workloads(VALUE_SETS["keda-external-redis"])
    assert "REDIS_URL" not in _router_env(VALUE_SETS["minimal"])


REDIS_TLS = VALUE_SETS["redis-tls"]


def test_redis_over_tls_with_client_certificates() -> None:
    """redis.tls.enabled: Redis serves TLS only and requires client certificates of the chart's CA;
    the router dials rediss:// presenting its certificate and trusting that CA; probes speak TLS."""
    c = _redis_container(REDIS_TLS)
    script = " ".join(c["args"])
    assert "--port 0 --tls-port 6379" in script and "--tls-auth-clients yes" in script
    files = {"cert-file": "tls.crt", "key-file": "tls.key", "ca-cert-file": "ca.crt"}
    for flag, name in files.items():
        assert f"--tls-{flag} /etc/redis/tls/{name}" in script
    pod = by_name(REDIS_TLS, "StatefulSet", f"{FULL}-redis")["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert vol["secret"]["secretName"] == TLS_SECRET
    assert {i["path"] for i in vol["secret"]["items"]} == set(files.values())
    assert {"name": "tls", "mountPath": "/etc/redis/tls", "readOnly": True} in c["volumeMounts"]
    for probe in ("livenessProbe", "readinessProbe"):
        command = c[probe]["exec"]["command"]
        assert command[:4] == ["redis-cli", "-p", "6379", "--tls"] and "--cert" in command, command
    _, router = _router(REDIS_TLS)
    assert _flag(router["args"], "--redis-url") == f"rediss://{FULL}-redis.llm.svc:6379/0"
    assert [_flag(router["args"], f) for f in ("--redis-ca", "--redis-cert", "--redis-key")] == [
        "/etc/k2serve/tls/ca.crt",
        "/etc/k2serve/tls/tls.crt",
        "/etc/k2serve/tls/tls.key",
    ]
    plain = " ".join(_redis_container(VALUE_SETS["defaults"])["args"])
    assert "--port 6379" in plain and "tls" not in plain
    _, router = _router(VALUE_SETS["defaults"])
    assert "--redis-ca" not in router["args"]


def test_external_redis_over_tls() -> None:
    values = {
        "tls": REDIS_TLS["tls"],
        "redis": {"enabled": False, "external": {"tls": True, "urlSecretRef": {"name": REDIS_URL_SECRET}}},
    }
    _, router = _router(values)
    assert _flag(router["args"], "--redis-ca") == "/etc/k2serve/tls/ca.crt"
    assert _flag(router["args"], "--redis-cert") == "/etc/k2serve/tls/tls.crt"


@pytest.mark.parametrize(
    "values",
    [
        {"redis": {"tls": {"enabled": True}}},
        {"tls": {"enabled": True, "existingSecret": TLS_SECRET}, "redis": {"tls": {"enabled": True}}},
        {"redis": {"enabled": False, "external": {"tls": True, "urlSecretRef": {"name": REDIS_URL_SECRET}}}},
    ],
)
def test_redis_tls_needs_the_chart_certificate_and_ca(values: dict[str, Any]) -> None:
    with pytest.raises(Exception, match="set tls.enabled and tls.caKey"):
        render_manifests(values)


def test_only_router_talks_to_redis() -> None:
    for owner, spec in pod_specs(VALUE_SETS["defaults"]):
        uses = any(e["name"].startswith("REDIS") for c in spec["containers"] for e in c.get("env", []))
        uses |= any("--redis-url" in c.get("args", []) for c in spec["containers"])
        assert uses == (owner.endswith("-router") or owner.endswith("-redis")), owner


def test_pods_roll_on_config_change() -> None:
    for name, w in workloads(VALUE_SETS["defaults"]).items():
        if not name.endswith("-redis"):
            assert "checksum/config" in w["spec"]["template"]["metadata"]["annotations"], name
    a = by_name({}, "Deployment", f"{FULL}-router")["spec"]["template"]["metadata"]["annotations"]
    b = by_name({"env": {"LOG_LEVEL": "debug"}}, "Deployment", f"{FULL}-router")["spec"]["template"][
        "metadata"
    ]
    assert a["checksum/config"] != b["annotations"]["checksum/config"]


def test_cluster_token_secret_is_generated_once_or_named() -> None:
    """Without clusterToken.existingSecret the chart makes a random token Secret (kept on uninstall, read
    back by lookup on upgrades) and mounts it 0440 into the router and every worker; with it, it only
    names that Secret."""
    (secret,) = [
        s for s in objects(VALUE_SETS["defaults"], "Secret") if s["metadata"]["name"].endswith("-token")
    ]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert len(base64.b64decode(secret["data"]["cluster-token"])) == 48
    for values, name, key in (
        (VALUE_SETS["defaults"], secret["metadata"]["name"], "cluster-token"),
        (VALUE_SETS["tls-apikey-secrets"], CLUSTER_TOKEN_SECRET, "token"),
    ):
        specs = [
            s for _, s in pod_specs(values) if s["containers"][0]["name"] in ("router", "prefill", "decode")
        ]
        assert len(specs) == 3
        for spec in specs:
            (vol,) = [v for v in spec["volumes"] if v["name"] == "cluster-token"]
            assert vol["secret"] == {
                "secretName": name,
                "defaultMode": 0o440,
                "items": [{"key": key, "path": "token"}],
            }
