"""The example values under deploy/values/ stay valid: they pass the schema, render, lint clean,
and every k2serve command line they produce parses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from test_helm_chart import NAMESPACE, ROOT, lint_errors, objects
from test_helm_cli_args import invocations, parse
from test_helm_objects import FULL

EXAMPLES = sorted((ROOT / "deploy" / "values").glob("*.yaml"))


def load(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(path.read_text())
    assert isinstance(values, dict), path
    return values


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {"cpu-smoke.yaml", "gpu-kimi-k2.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_renders_lints_and_parses(path: Path) -> None:
    values = load(path)
    assert objects(values), path
    assert lint_errors(values) == []
    commands = {argv[0] for _, _, argv in invocations(values)}
    assert commands >= {"router", "prefill", "decode"}
    for owner, _, argv in invocations(values):
        assert parse(argv).command == argv[0], owner


def test_gpu_example_shape() -> None:
    values = load(ROOT / "deploy" / "values" / "gpu-kimi-k2.yaml")
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects(values)}
    assert {k for k, _ in kinds} >= {"ServiceMonitor", "NetworkPolicy", "PodDisruptionBudget"}
    pods = {o["metadata"]["name"]: o["spec"]["replicas"] for o in objects(values, "StatefulSet")}
    assert (pods[f"{FULL}-prefill"], pods[f"{FULL}-decode"]) == (2 * 8, 2 * 16)  # groups x ranks
    ranks = [parse(argv) for _, _, argv in invocations(values) if argv[0] == "decode"]
    assert sorted(ns.ep_rank for ns in ranks) == sorted(list(range(16)) * 2)
    # TLS on every hop, so KV over gRPC: workers refuse the plaintext torch backend with --tls-*.
    workers = [parse(argv) for _, _, argv in invocations(values) if argv[0] in ("prefill", "decode")]
    assert {(ns.transfer_backend, ns.tls_cert) for ns in workers} == {("grpc", "/etc/k2serve/tls/tls.crt")}
    assert ("Secret", f"{FULL}-redis-auth") not in kinds  # the password comes from k2-redis


def test_gpu_example_encrypts_and_authenticates_every_hop() -> None:
    """Its comment says every hop is encrypted: mutual TLS on every k2serve process (each presents the
    certificate and requires peers signed by the CA), and Redis over TLS only, with client
    certificates required and the router dialling rediss:// with its certificate and the CA."""
    values = load(ROOT / "deploy" / "values" / "gpu-kimi-k2.yaml")
    runs = [parse(argv) for _, _, argv in invocations(values) if argv[0] in ("router", "prefill", "decode")]
    assert {(ns.tls_cert, ns.tls_key, ns.tls_ca) for ns in runs} == {
        ("/etc/k2serve/tls/tls.crt", "/etc/k2serve/tls/tls.key", "/etc/k2serve/tls/ca.crt")
    }
    (router,) = [ns for ns in runs if ns.command == "router"]
    assert router.redis_url == f"rediss://{FULL}-redis.{NAMESPACE}.svc:6379/0"
    assert (router.redis_ca, router.redis_cert, router.redis_key) == (
        "/etc/k2serve/tls/ca.crt",
        "/etc/k2serve/tls/tls.crt",
        "/etc/k2serve/tls/tls.key",
    )
    assert router.redis_password_file == "/etc/k2serve/redis/password"  # noqa: S105 - a path
    (redis,) = [o for o in objects(values, "StatefulSet") if o["metadata"]["name"] == f"{FULL}-redis"]
    script = " ".join(redis["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--port 0 --tls-port 6379" in script and "--tls-auth-clients yes" in script
    assert "--tls-ca-cert-file /etc/redis/tls/ca.crt" in script
