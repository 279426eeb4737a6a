"""The example values under deploy/values/ stay valid: they pass the schema, render, lint clean,
and every k2serve command line they produce parses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from test_helm_chart import ROOT, lint_errors, objects
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
