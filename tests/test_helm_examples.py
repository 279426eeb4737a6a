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

from k2serve.capacity.devices import GPUS
from k2serve.capacity.memory import Layout, Workload, load_config, plan

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


GiB = 1 << 30
UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": GiB, "Ti": 1 << 40}


def quantity(text: str) -> int:
    """Bytes of a Kubernetes memory quantity ("143Gi", "512Mi", a plain number)."""
    for suffix, unit in UNITS.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * unit)
    return int(text)


def test_gpu_example_fits_the_plan() -> None:
    """Every worker rank of the GPU example, as its rendered command line asks, fits an H200 by
    `k2serve plan`'s arithmetic for Kimi-K2-Thinking: weights + activations + one max-model-len
    sequence within its memory budget, the budget within 90% of the device, and the pod's memory limit
    above the budget."""
    values = load(ROOT / "deploy" / "values" / "gpu-kimi-k2.yaml")
    assert values["model"]["path"].endswith("Kimi-K2-Thinking")
    k2 = load_config("kimi-k2-thinking")
    h200 = GPUS["h200"].memory_bytes
    checked = set()
    for _, container, argv in invocations(values):
        if argv[0] not in ("prefill", "decode"):
            continue
        ns = parse(argv)
        assert ns.memory_budget_mb is not None and ns.kv_cache_mb is None
        budget = ns.memory_budget_mb << 20
        assert budget <= 0.9 * h200
        work = Workload(ns.max_model_len, ns.max_num_batched_tokens, ns.max_num_seqs)
        rank = plan(k2, "h200", budget, Layout(ep=ns.ep), work, utilization=1.0)
        rank.check()  # raises, naming the numbers, when it does not fit
        assert ns.max_model_len == k2.max_position_embeddings == 262_144  # K2's full length
        limit = quantity(container["resources"]["limits"]["memory"])
        assert limit >= budget + 16 * GiB, (argv[0], limit, budget)
        checked.add((argv[0], ns.ep, rank.sessions_per_rank))
    assert checked == {("prefill", 8, 1), ("decode", 16, 3)}
