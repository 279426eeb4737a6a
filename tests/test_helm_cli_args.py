"""Every `k2serve` invocation the chart renders is accepted by k2serve.cli.build_parser(), with each
flag value of the declared type, and the flags agree with the rest of the chart (ports, Services,
the model directory). An expert-parallel worker starts through a `sh -c` launcher that derives its
rank from the pod's ordinal: that script runs here under a real `sh`, once per pod, with a stand-in
`k2serve` on PATH that reports the argv it was exec'd with."""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from test_helm_chart import NAMESPACE, VALUE_SETS, by_name, objects
from test_helm_objects import FULL, pod_specs

from k2serve.cli import build_parser
from k2serve.cli.settings import engine_config
from k2serve.rpc.auth import write_token_file

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# $(POD_NAME) of a pod whose command line is the same on every pod of its workload.
ANY_POD = "<POD_NAME>"


def _expand(arg: str, env: dict[str, str], owner: str) -> str:
    """$(VAR) expanded as the kubelet does in command and args; an undefined variable fails the test."""

    def sub(m: re.Match[str]) -> str:
        assert m[1] in env, f"{owner}: $({m[1]}) is not defined in the container env"
        return env[m[1]]

    return _VAR.sub(sub, arg)


@functools.cache
def _stand_in_path() -> str:
    """A directory holding a `k2serve` that prints its arguments, NUL-terminated, and exits."""
    d = tempfile.mkdtemp(prefix="k2serve-stand-in-")
    atexit.register(shutil.rmtree, d, True)
    exe = os.path.join(d, "k2serve")
    with open(exe, "w") as f:
        f.write("#!/bin/sh\nprintf '%s\\0' \"$@\"\n")
    os.chmod(exe, 0o755)
    return d


def run_launcher(command: list[str], args: list[str], pod_name: str) -> list[str]:
    """The argv (after `k2serve`) that a `sh -c SCRIPT k2serve ARGS...` launcher execs in pod_name."""
    assert command[:2] == ["sh", "-c"] and command[3:] == ["k2serve"], command
    env = {"PATH": f"{_stand_in_path()}:{os.environ['PATH']}", "POD_NAME": pod_name}
    out = subprocess.run(["sh", *command[1:], *args], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def invocations(values: dict[str, Any]) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(owner, container, argv after `k2serve`) of every container that runs k2serve, $(VAR)s
    expanded as the kubelet would. Owner is "Kind/name", and for an expert-parallel launcher, whose
    argv depends on the pod, one entry per pod of the StatefulSet: "StatefulSet/name/pod"."""
    out = []
    for owner, spec in pod_specs(values):
        for c in spec.get("initContainers", []) + spec["containers"]:
            command = c.get("command") or []
            if "k2serve" not in command:
                assert "k2serve" not in " ".join(command), (owner, c["name"], command)
                continue
            env = {e["name"]: e.get("value", f"<{e['name']}>") for e in c.get("env", [])}
            if command == ["k2serve"]:
                argv = [_expand(a, env, owner) for a in c.get("args", [])]
                assert all(isinstance(a, str) for a in argv), (owner, argv)
                out.append((owner, c, argv))
                continue
            kind, name = owner.split("/")
            assert kind == "StatefulSet", f"{owner}: a launcher needs a pod ordinal"
            for ordinal in range(by_name(values, kind, name)["spec"]["replicas"]):
                pod = f"{name}-{ordinal}"
                env["POD_NAME"] = pod
                args = [_expand(a, env, owner) for a in c.get("args", [])]
                out.append((f"{owner}/{pod}", c, run_launcher(command, args, pod)))
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
    assert (router.port, router.grpc_port, router.internal_port) == (
        ports["http"],
        ports["grpc"],
        ports["internal"],
    )
    assert {p["name"]: p["port"] for p in router_svc} == {
        "http": router.port,
        "grpc": router.grpc_port,
        "internal": router.internal_port,
    }
    # Every router and worker reads the cluster token from the Secret mounted where its flag points.
    for command in ("router", "prefill", "decode"):
        for owner, c, ns in cmds[command]:
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            assert ns.cluster_token_file == f"{mounts['cluster-token']}/token", owner
            assert not ns.insecure_internal, owner
    model_dirs = {ns.model for runs in cmds.values() for _, _, ns in runs if getattr(ns, "model", None)}
    assert len(model_dirs) == 1, model_dirs
    for ns in (ns for _, _, ns in cmds.get("init-model", [])):
        assert ns.dir in model_dirs
    for role in ("prefill", "decode"):
        ep = values.get(role, {}).get("ep", {})
        for owner, c, ns in cmds[role]:
            pod = owner.split("/")[2] if owner.count("/") == 2 else ANY_POD
            assert ns.port == next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc"), owner
            assert ns.ep == ep.get("size", 1), owner
            assert ns.worker_id == pod, owner
            if ns.transfer_backend == "torch":
                assert ns.transfer_port == next(
                    p["containerPort"] for p in c["ports"] if p["name"] == "transfer"
                )
            assert ns.router == f"{FULL}-router.{NAMESPACE}.svc:{router.internal_port}", owner
            assert ns.advertise_host == f"{pod}.{FULL}-{role}-headless.{NAMESPACE}.svc", owner
            if ns.ep > 1:
                assert ns.ep_init.endswith(
                    f":{next(p['containerPort'] for p in c['ports'] if p['name'] == 'ep')}"
                ), owner


def test_ep_ranks_follow_pod_ordinals(tmp_path: Path) -> None:
    """Pod i of an expert-parallel StatefulSet is rank i % size of group i // size and joins its
    group at the group's rank-0 pod; the flags pass the worker's own checks (WorkerSettings, via the CLI's
    worker_settings); ep.eplb reaches the worker as its EPLB config (redundant slots split over the group)."""
    from k2serve.cli.settings import worker_settings
    from k2serve.experts.comm import parse_init_method
    from k2serve.experts.eplb import EPLBConfig
    from k2serve.worker.runtime import ep_config

    values = VALUE_SETS["ep-groups"]
    cmds = _by_command(values)
    for role, groups, size, port, timeout in (("prefill", 2, 4, 50062, 300), ("decode", 3, 8, 29500, 900)):
        sts = f"{FULL}-{role}"
        by_pod = {owner.split("/")[2]: ns for owner, _, ns in cmds[role]}
        assert set(by_pod) == {f"{sts}-{i}" for i in range(groups * size)}
        for i in range(groups * size):
            ns = by_pod[f"{sts}-{i}"]
            group, rank = divmod(i, size)
            rank0 = f"{sts}-{group * size}.{sts}-headless.{NAMESPACE}.svc"
            assert (ns.ep, ns.ep_rank, ns.ep_init, ns.ep_timeout) == (
                size,
                rank,
                f"tcp://{rank0}:{port}",
                timeout,
            )
            token = tmp_path / "token"  # the Secret's file, as mounted in the pod
            write_token_file(token, "t" * 32)
            settings = worker_settings(
                role, argparse.Namespace(**{**vars(ns), "cluster_token_file": str(token)})
            )
            assert settings.internal.token == "t" * 32
            assert settings.worker_id == f"{sts}-{i}-ep{rank}"  # each rank registers as its own worker
            assert parse_init_method(settings.ep_init) == (rank0, port)
            eplb = EPLBConfig(500, 2000, 16) if role == "decode" else None  # EPLB on for decode only
            assert settings.eplb == eplb and ep_config(settings).redundant_per_rank == (2 if eplb else 0)
    single = _by_command(VALUE_SETS["defaults"])["decode"]
    assert [(ns.ep, ns.ep_rank, ns.ep_init) for _, _, ns in single] == [(1, 0, None)]


def test_engine_flags_carry_values() -> None:
    (_, _, ns) = _by_command(VALUE_SETS["gpu-hpa"])["decode"][0]
    assert (ns.kv_cache_mb, ns.max_model_len, ns.no_prefix_caching) == (1000000, 131072, True)
    assert (ns.dtype, ns.transfer_backend, ns.transfer_port) == ("bfloat16", "torch", 50071)
    assert (ns.kv_offload_host_mb, ns.kv_offload_dir, ns.kv_offload_disk_mb, ns.kv_session_lease_s) == (
        2048,
        "/kv-tier",
        8192,
        30.0,
    )
    for role in ("prefill", "decode"):  # the async tier flags reach every worker's engine config
        for owner, _, ns in _by_command(VALUE_SETS["gpu-hpa"])[role]:
            cfg = engine_config(ns)
            assert (cfg.kv_offload_async, cfg.kv_reload_timeout_s, cfg.kv_session_lease_s) == (
                False,
                3.0,
                30.0,
            ), owner
        cfg = engine_config(_by_command(VALUE_SETS["defaults"])[role][0][2])
        assert (cfg.kv_offload_async, cfg.kv_reload_timeout_s, cfg.kv_store_put_on_compute) == (
            True,
            10.0,
            True,
        )
    (_, _, ns) = _by_command(VALUE_SETS["defaults"])["decode"][0]
    assert (ns.max_model_len, ns.no_prefix_caching, ns.dtype) == (None, False, "float32")
    assert (ns.kv_offload_host_mb, ns.kv_offload_dir, ns.kv_offload_disk_mb, ns.kv_session_lease_s) == (
        0,
        None,
        0,
        0.0,
    )


def test_kv_store_flags_point_at_the_charts_master() -> None:
    """kvStore: every worker gets --kv-store mooncake with the chart's master Service (RPC and metadata
    ports) and its pod IP; an existing master is named instead, and no master of the chart's is run."""
    values = VALUE_SETS["kvstore"]
    svc = by_name(values, "Service", f"{FULL}-kvstore")
    host = f"{FULL}-kvstore.{NAMESPACE}.svc"
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert ports == {"rpc": 50088, "metadata": 8080}
    master = by_name(values, "Deployment", f"{FULL}-kvstore")["spec"]["template"]["spec"]["containers"][0]
    assert master["command"] == ["mooncake_master"] and "-rpc_port=50088" in master["args"]
    for role in ("prefill", "decode"):
        for owner, _, ns in _by_command(values)[role]:
            assert (ns.kv_store, ns.kv_store_master) == ("mooncake", f"{host}:50088"), owner
            assert ns.kv_store_metadata == f"http://{host}:8080/metadata", owner
            assert (ns.kv_store_segment_mb, ns.kv_store_put_on_compute) == (2048, False), owner
            assert ns.kv_store_local_hostname == "<POD_IP>", owner  # $(POD_IP): the downward API
            cfg = engine_config(ns)
            assert (cfg.kv_store, cfg.kv_store_segment_bytes) == ("mooncake", 2048 << 20)
    external = {"kvStore": {"backend": "mooncake", "master": "store.infra:50051"}}
    (_, _, ns) = _by_command(external)["prefill"][0]
    assert (ns.kv_store_master, ns.kv_store_metadata, ns.kv_store_put_on_compute) == (
        "store.infra:50051",
        None,
        True,
    )
    assert engine_config(ns).kv_store_metadata_url == "http://store.infra:8080/metadata"
    assert not [o for o in objects(external, "Deployment") if o["metadata"]["name"].endswith("-kvstore")]
    (_, _, ns) = _by_command(VALUE_SETS["defaults"])["prefill"][0]
    assert ns.kv_store == "none"
    assert not [o for o in objects(VALUE_SETS["defaults"]) if o["metadata"]["name"] == f"{FULL}-kvstore"]


def test_router_tls_and_api_key_flags() -> None:
    (_, c, ns) = _by_command(VALUE_SETS["tls-apikey-secrets"])["router"][0]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert ns.tls_cert == f"{mounts['tls']}/tls.crt" and ns.tls_key == f"{mounts['tls']}/tls.key"
    assert ns.api_key is None  # the key reaches the router as $K2SERVE_API_KEY, never as a flag
    assert ns.served_model_name == "kimi-k2"


def test_gpu_workers_run_on_cuda_with_nccl_settings() -> None:
    """gpu.enabled: every worker gets --device cuda (an expert-parallel rank too: NCCL collectives,
    one GPU per pod), /dev/shm sized by gpu.shmSize, and gpu.nccl.env in its environment; without
    GPUs no --device flag, the role's shmSize and no NCCL variables."""
    values = {**VALUE_SETS["gpu-hpa"], "gpu": {"enabled": True, "shmSize": "24Gi", "nccl": {"env": _NCCL}}}
    for role in ("prefill", "decode"):
        for _, c, ns in _by_command(values)[role]:
            assert ns.device == "cuda"
            assert engine_config(ns).device == "cuda"
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert {k: env[k] for k in _NCCL} == _NCCL
            assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["dshm"] == "/dev/shm"
        spec = by_name(values, "StatefulSet", f"{FULL}-{role}")["spec"]["template"]["spec"]
        dshm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "24Gi"}
    for role in ("prefill", "decode"):  # expert-parallel ranks: one GPU each, the engine on it
        assert {ns.device for _, _, ns in _by_command(VALUE_SETS["ep-groups"])[role]} == {"cuda"}
    for role in ("prefill", "decode"):
        for _, c, ns in _by_command(VALUE_SETS["defaults"])[role]:
            assert ns.device is None and not any(e["name"].startswith("NCCL_") for e in c["env"])
        spec = by_name(VALUE_SETS["defaults"], "StatefulSet", f"{FULL}-{role}")["spec"]["template"]["spec"]
        assert next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "1Gi"


_NCCL = {"NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_DISABLE": "1"}


def test_gpu_workers_move_kv_over_torch_distributed_by_default() -> None:
    """transfer.backend auto (the default): torch (NCCL point to point between the GPUs) with
    gpu.enabled, its port fixed and exposed; grpc without GPUs and under tls.enabled (torch has no
    TLS); an explicit grpc is kept on GPUs."""

    def backends(values: dict[str, Any]) -> set[tuple[str, str, int]]:
        cmds = _by_command(values)
        return {
            (role, ns.transfer_backend, ns.transfer_port)
            for role in ("prefill", "decode")
            for _, _, ns in cmds[role]
        }

    gpu = {"gpu": {"enabled": True}}
    assert backends(gpu) == {("prefill", "torch", 50061), ("decode", "torch", 50071)}
    for role, port in (("prefill", 50061), ("decode", 50071)):
        sts = by_name(gpu, "StatefulSet", f"{FULL}-{role}")["spec"]["template"]["spec"]
        ports = {p["name"]: p["containerPort"] for p in sts["containers"][0]["ports"]}
        assert ports["transfer"] == port
        svc = by_name(gpu, "Service", f"{FULL}-{role}-headless")["spec"]["ports"]
        assert {p["name"]: p["port"] for p in svc}["transfer"] == port
    assert {b for _, b, _ in backends(VALUE_SETS["defaults"])} == {"grpc"}
    tls_gpu = {**VALUE_SETS["tls-apikey-secrets"], **gpu}
    assert {b for _, b, _ in backends(tls_gpu)} == {"grpc"}
    explicit = {**gpu, "decode": {"transfer": {"backend": "grpc"}}}
    assert {(r, b) for r, b, _ in backends(explicit)} == {("prefill", "torch"), ("decode", "grpc")}
