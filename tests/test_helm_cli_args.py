"""Every `k2serve` invocation the chart renders is accepted by k2serve.cli.build_parser(), with each
flag value of the declared type, and the flags agree with the rest of the chart (ports, Services,
the model directory)."""

from __future__ import annotations

import argparse
import re
from typing import Any

import pytest
from test_helm_chart import NAMESPACE, VALUE_SETS, by_name
from test_helm_objects import FULL, pod_specs

from k2serve.cli import build_parser

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# Injected into every container of a LeaderWorkerSet pod by its controller.
LWS_ENV = {"LWS_LEADER_ADDRESS": "k2-k2serve-prefill-0.k2-k2serve-prefill.llm", "LWS_GROUP_SIZE": "2"}


def invocations(values: dict[str, Any]) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(owner, container, argv after `k2serve`) of every container that runs k2serve, $(VAR)s
    expanded as the kubelet would (a reference to an undefined variable fails the test)."""
    out = []
    for owner, spec in pod_specs(values):
        for c in spec.get("initContainers", []) + spec["containers"]:
            command = c.get("command") or []
            if command[:1] != ["k2serve"]:
                assert "k2serve" not in " ".join(command), (owner, c["name"], command)
                continue
            env = {e["name"]: e.get("value", f"<{e['name']}>") for e in c.get("env", [])}
            if owner.startswith("LeaderWorkerSet/"):
                env |= LWS_ENV

            def expand(arg: str, env: dict[str, str] = env, owner: str = owner) -> str:
                def sub(m: re.Match[str]) -> str:
                    assert m[1] in env, f"{owner}: $({m[1]}) is not defined in the container env"
                    return env[m[1]]

                return _VAR.sub(sub, arg)

            argv = [expand(a) for a in command[1:] + c.get("args", [])]
            assert all(isinstance(a, str) for a in argv), (owner, argv)
            out.append((owner, c, argv))
    return out


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def parse(argv: list[str]) -> argparse.Namespace:
    """build_parser().parse_args, with argparse's exit turned into a test failure."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # argparse reports the bad flag on stderr
        raise AssertionError(f"k2serve rejected {argv}") from e
    for action in _subparser(parser, ns.command)._actions:
        value = getattr(ns, action.dest, None)
        if value is None or action.dest == "help":
            continue
        if isinstance(action.type, type):
            assert isinstance(value, action.type), (action.dest, value)
        if action.choices is not None:
            assert value in action.choices, (action.dest, value)
    return ns


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_invocation_parses(name: str) -> None:
    found = invocations(VALUE_SETS[name])
    assert {argv[0] for _, _, argv in found} >= {"router", "prefill", "decode"}
    for owner, c, argv in found:
        ns = parse(argv)
        assert ns.command == argv[0], owner
        if ns.command in ("router", "prefill", "decode"):
            assert ns.host == "0.0.0.0", (owner, c["name"])


def test_parse_rejects_what_the_chart_must_not_render() -> None:
    with pytest.raises(AssertionError):
        parse(["router", "--model", "/m", "--grpc-port", "fifty"])
    with pytest.raises(AssertionError):
        parse(["prefill", "--model", "/m", "--no-such-flag", "1"])


def _by_command(values: dict[str, Any]) -> dict[str, list[tuple[str, dict[str, Any], argparse.Namespace]]]:
    out: dict[str, list[tuple[str, dict[str, Any], argparse.Namespace]]] = {}
    for owner, c, argv in invocations(values):
        out.setdefault(argv[0], []).append((owner, c, parse(argv)))
    return out


@pytest.mark.parametrize("name", VALUE_SETS)
def test_flags_agree_with_ports_services_and_model(name: str) -> None:
    values = VALUE_SETS[name]
    cmds = _by_command(values)
    router_svc = by_name(values, "Service", f"{FULL}-router")["spec"]["ports"]
    (_, router_c, router) = cmds["router"][0]
    ports = {p["name"]: p["containerPort"] for p in router_c["ports"]}
    assert (router.port, router.grpc_port) == (ports["http"], ports["grpc"])
    assert {p["name"]: p["port"] for p in router_svc} == {"http": router.port, "grpc": router.grpc_port}
    model_dirs = {ns.model for runs in cmds.values() for _, _, ns in runs if getattr(ns, "model", None)}
    assert len(model_dirs) == 1, model_dirs
    for ns in (ns for _, _, ns in cmds.get("init-model", [])):
        assert ns.dir in model_dirs
    for role in ("prefill", "decode"):
        ep = values.get(role, {}).get("ep", {})
        for owner, c, ns in cmds[role]:
            assert ns.port == next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc"), owner
            assert ns.ep == ep.get("size", 1), owner
            assert ns.worker_id == "<POD_NAME>", owner
            if ns.transfer_backend == "torch":
                assert ns.transfer_port == next(
                    p["containerPort"] for p in c["ports"] if p["name"] == "transfer"
                )
            if owner.endswith("/worker"):  # a non-leader member of an EP group does not register
                assert ns.router is None, owner
            else:
                assert ns.router == f"{FULL}-router.{NAMESPACE}.svc:{router.grpc_port}", owner
            if owner.startswith("StatefulSet/"):
                assert ns.advertise_host == f"<POD_NAME>.{FULL}-{role}-headless.{NAMESPACE}.svc", owner


def test_engine_flags_carry_values() -> None:
    (_, _, ns) = _by_command(VALUE_SETS["gpu-hpa"])["decode"][0]
    assert (ns.kv_cache_mb, ns.max_model_len, ns.no_prefix_caching) == (1000000, 131072, True)
    assert (ns.dtype, ns.transfer_backend, ns.transfer_port) == ("bfloat16", "torch", 50071)
    (_, _, ns) = _by_command(VALUE_SETS["defaults"])["decode"][0]
    assert (ns.max_model_len, ns.no_prefix_caching, ns.dtype) == (None, False, "float32")


def test_router_tls_and_api_key_flags() -> None:
    (_, c, ns) = _by_command(VALUE_SETS["tls-apikey-secrets"])["router"][0]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert ns.tls_cert == f"{mounts['tls']}/tls.crt" and ns.tls_key == f"{mounts['tls']}/tls.key"
    assert ns.api_key is None  # the key reaches the router as $K2SERVE_API_KEY, never as a flag
    assert ns.served_model_name == "kimi-k2"
