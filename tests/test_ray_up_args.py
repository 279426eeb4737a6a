"""`k2serve up --ray` without a Ray cluster: flags to ClusterSpec and RayOptions, the command lines
both launchers give the router and the workers (TLS and router flags included), and the error when the
`ray` package is missing."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from k2serve.cli import build_parser, main
from k2serve.cli.settings import cluster_spec, gpus_to_spread, ray_options
from k2serve.cluster.local import LocalCluster, Proc, gpu_env
from k2serve.cluster.ray_actor import NODE_IP, REDIS_PASSWORD_FILE, REDIS_URL
from k2serve.cluster.ray_plan import GroupPlan, RayOptions, plan_groups
from k2serve.cluster.ray_runtime import RayCluster, RayUnavailableError

if TYPE_CHECKING:
    from conftest import PKI  # the `pki` fixture's certificates

UP = ["up", "--model", "/models/k2", "--ray", "auto", "--prefill", "2", "--decode", "3", "--ep", "4"]


def test_spec_from_up_flags() -> None:
    args = build_parser().parse_args([*UP, "--kv-cache-mb", "64", "--no-prefix-caching", "--host", "0.0.0.0"])
    spec = cluster_spec(args)
    assert (spec.model_dir, spec.num_prefill, spec.num_decode, spec.ep_size) == ("/models/k2", 2, 3, 4)
    assert spec.host == "0.0.0.0" and spec.num_worker_processes == 20
    assert spec.engine_args[spec.engine_args.index("--kv-cache-mb") + 1] == "64"
    assert "--no-prefix-caching" in spec.engine_args


def test_worker_args_both_launchers_pass_to_an_ep_rank() -> None:
    args = build_parser().parse_args(
        [*UP, "--kv-cache-mb", "64", "--served-model-name", "k2", "--transfer-backend", "torch"]
    )
    spec = cluster_spec(args)
    argv = spec.worker_args("decode", "decode-1", "10.0.0.2", "10.0.0.1:50051", 3, "tcp://10.0.0.2:4000")
    assert argv == [
        *("decode", "--model", "/models/k2", "--dtype", "float32", "--host", "10.0.0.2", "--port", "0"),
        *("--router", "10.0.0.1:50051", "--worker-id", "decode-1", "--transfer-backend", "torch"),
        *spec.engine_args,
        *("--served-model-name", "k2", "--ep", "4", "--ep-rank", "3", "--ep-init", "tcp://10.0.0.2:4000"),
    ]
    parsed = build_parser().parse_args(argv)  # what the worker process will see
    assert (parsed.command, parsed.kv_cache_mb, parsed.ep, parsed.ep_rank) == ("decode", 64, 4, 3)
    with pytest.raises(ValueError, match="decode-1 of an EP group of 4 needs ep_init"):
        spec.worker_args("decode", "decode-1", "10.0.0.2", "10.0.0.1:50051", 3)


def tls_flags(pki: PKI) -> list[str]:
    return ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--tls-ca", str(pki.ca)]


def test_ray_router_gets_router_flags_and_tls(pki: PKI) -> None:
    """The router actor's command line is the shared one: --max-ttft-ms, the API key and the TLS files
    reach it, and the embedded Redis's URL and password file are filled in by its actor."""
    flags = [*UP, "--max-ttft-ms", "2000", "--api-key", "sk-1", *tls_flags(pki), "--tls-server-name", "k2"]
    spec = cluster_spec(build_parser().parse_args(flags))
    child = RayCluster(spec, "auto").router_child()
    assert child.name == "router" and child.embedded_redis
    assert list(child.argv) == [
        *("router", "--model", "/models/k2", "--host", NODE_IP, "--port", "8000", "--grpc-port", "50051"),
        *(
            "--internal-port",
            "0",
            "--heartbeat-timeout",
            "5.0",
            "--redis-url",
            REDIS_URL,
            "--redis-password-file",
            REDIS_PASSWORD_FILE,
        ),
        *(*tls_flags(pki), "--tls-server-name", "k2"),
        *("--max-ttft-ms", "2000.0", "--api-key", "sk-1"),
    ]
    parsed = build_parser().parse_args(list(child.argv))  # what the router process will see
    assert (parsed.max_ttft_ms, parsed.tls_ca, parsed.tls_server_name) == (2000.0, str(pki.ca), "k2")
    # The cluster token travels beside the argv (each actor writes its own 0600 file), never the API key.
    assert child.cluster_token is not None and len(child.cluster_token) >= 32
    assert child.cluster_token not in child.argv and "sk-1" not in child.cluster_token


def test_ray_workers_get_tls_and_the_grpc_kv_backend(pki: PKI) -> None:
    spec = cluster_spec(build_parser().parse_args([*UP, *tls_flags(pki)]))
    assert spec.transfer_backend == "grpc"  # "auto" under TLS: torch.distributed has no TLS
    cluster = RayCluster(spec, "auto")
    cluster.router_ip, cluster.grpc_port, cluster.internal_port = "10.0.0.1", 50051, 50052
    group = GroupPlan("decode-1", "decode", 1, tuple({"CPU": 1.0} for _ in range(4)), "STRICT_PACK")
    children = cluster.worker_children(group, "tcp://10.0.0.2:4000")
    assert [c.name for c in children] == [f"decode-1-ep{r}" for r in range(4)]
    for r, c in enumerate(children):
        assert list(c.argv) == spec.worker_args(  # registering on the router's internal listener
            "decode", "decode-1", NODE_IP, "10.0.0.1:50052", r, "tcp://10.0.0.2:4000"
        )
        assert c.cluster_token == cluster.token
        parsed = build_parser().parse_args(list(c.argv))
        assert (parsed.tls_cert, parsed.tls_key, parsed.tls_ca) == (str(pki.cert), str(pki.key), str(pki.ca))
        assert (parsed.transfer_backend, parsed.ep_rank) == ("grpc", r)
    assert cluster.http_url == "https://10.0.0.1:8000"  # the router serves HTTPS with the same certificate


def test_plaintext_ray_cluster_has_no_tls_flags() -> None:
    spec = cluster_spec(build_parser().parse_args([*UP, "--redis-url", "redis://r:6379/0"]))
    cluster = RayCluster(spec, "auto")
    router = cluster.router_child()
    assert not router.embedded_redis and "redis://r:6379/0" in router.argv
    group = GroupPlan("prefill-0", "prefill", 0, tuple({"CPU": 1.0} for _ in range(4)), "STRICT_PACK")
    argv = [a for c in [router, *cluster.worker_children(group, "tcp://10.0.0.2:4000")] for a in c.argv]
    assert not [a for a in argv if a.startswith("--tls")]
    assert cluster.http_url.startswith("http://")


def test_local_launcher_uses_the_same_router_and_worker_args(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LocalCluster.start() spawns the shared command lines plus its ready files (processes faked); the
    password of a --redis-url moves into a 0600 file, off the router's command line."""
    flags = [
        "up",
        "--model",
        "/models/k2",
        "--max-ttft-ms",
        "1500",
        *tls_flags(pki),
        "--workdir",
        str(tmp_path),
    ]
    spec = cluster_spec(build_parser().parse_args([*flags, "--redis-url", "redis://:s%40cret@r:6379/0"]))
    cluster = LocalCluster(spec)
    spawned: dict[str, list[str]] = {}

    def spawn(name: str, args: list[str], extra_env: dict[str, str] | None = None) -> Proc:
        spawned[name] = args
        assert not extra_env  # no GPUs to spread over
        return Proc(name, None, tmp_path / f"{name}.log")  # type: ignore[arg-type]

    monkeypatch.setattr(cluster, "_spawn", spawn)
    monkeypatch.setattr(cluster, "_wait_file", lambda proc, path, deadline: "8001 50052 50053")
    monkeypatch.setattr(cluster, "_wait_registered", lambda n, deadline: None)
    cluster.start()
    spec = cluster.spec  # with the cluster token file the launcher generated
    token_file = tmp_path / "cluster-token"
    assert spec.cluster_token_file == str(token_file) and token_file.stat().st_mode & 0o777 == 0o600
    password_file = tmp_path / "redis-password"
    redis = ["--redis-url", "redis://r:6379/0", "--redis-password-file", str(password_file)]
    router = spec.router_args_for("127.0.0.1", 8000, 50051, redis)
    assert spawned["router"] == [*router, "--ready-file", str(tmp_path / "router.ready")]
    assert password_file.read_text() == "s@cret" and password_file.stat().st_mode & 0o777 == 0o600
    assert not [a for a in spawned["router"] if "cret" in a]
    assert router[router.index("--max-ttft-ms") + 1] == "1500.0" and "--tls-ca" in router
    worker = spec.worker_args("decode", "decode-0", "127.0.0.1", "127.0.0.1:50053")
    assert spawned["decode-0"] == [*worker, "--ready-file", str(tmp_path / "decode-0.ready")]
    assert worker[-8:] == [*tls_flags(pki), "--cluster-token-file", str(token_file)]
    assert router[router.index("--cluster-token-file") + 1] == str(token_file)


def test_options_default_without_ray_flags() -> None:
    opts = ray_options(build_parser().parse_args(UP))
    assert opts == RayOptions()
    assert dict(opts.rank_resources) == {"CPU": 1.0}


def test_options_from_ray_flags_when_the_cli_has_them() -> None:
    args = build_parser().parse_args(UP)
    args.ray_cpus_per_rank, args.ray_gpus_per_rank = 8, 1
    args.ray_group_strategy, args.ray_max_restarts = "PACK", 0  # 0: never restart (not the default)
    opts = ray_options(args)
    assert dict(opts.rank_resources) == {"CPU": 8.0, "GPU": 1.0}
    assert (opts.group_strategy, opts.max_restarts) == ("PACK", 0)


def test_without_the_ray_package_up_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RayUnavailableError, match=r"pip install 'k2serve\[ray\]'"):
        RayCluster(cluster_spec(build_parser().parse_args(UP)), "auto").start()
    assert main(list(UP)) == 2  # the CLI sends --ray to the Ray launcher
    assert "k2serve[ray]" in capsys.readouterr().err


def test_ranks_ask_ray_for_a_gpu_when_the_workers_run_on_cuda() -> None:
    from k2serve.cluster.ray_plan import gpus_per_rank

    assert (gpus_per_rank(None, None), gpus_per_rank("cpu", None), gpus_per_rank("cuda", None)) == (0, 0, 1)
    assert (gpus_per_rank("cuda:0", 2), gpus_per_rank("cpu", 0.5)) == (2, 0.5)
    with pytest.raises(ValueError, match="--device cuda needs --ray-gpus-per-rank > 0"):
        gpus_per_rank("cuda", 0)
    base = [a for a in UP if a not in ("--ep", "4")]
    opts = ray_options(build_parser().parse_args([*base, "--device", "cuda"]))
    assert dict(opts.rank_resources) == {"CPU": 1.0, "GPU": 1.0}
    spec = cluster_spec(build_parser().parse_args([*base, "--device", "cuda"]))
    assert spec.engine_args[spec.engine_args.index("--device") + 1] == "cuda"  # every worker gets it
    plan = plan_groups(spec, opts, [])
    workers = [g for g in plan if g.role != "router"]
    assert len(workers) == 5 and all(b == {"CPU": 1.0, "GPU": 1.0} for g in workers for b in g.bundles)
    assert plan[0].bundles == ({"CPU": 1.0},)  # the router asks for no GPU
    assert dict(ray_options(build_parser().parse_args([*base, "--device", "cpu"])).rank_resources) == {
        "CPU": 1.0
    }


def test_up_spreads_its_workers_over_the_hosts_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a host with several GPUs and `--device cuda` (or no --device), each worker process gets one
    GPU in turn through CUDA_VISIBLE_DEVICES, so the ranks of an EP group sit on distinct GPUs and the
    workers do not all open cuda:0; an explicit cuda:N, one GPU or CPU pins nothing."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert gpus_to_spread("cuda") == 4 and gpus_to_spread(None) == 4
    assert gpus_to_spread("cuda:1") == 0 and gpus_to_spread("cpu") == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert gpus_to_spread("cuda") == 0
    assert gpu_env(5, 4) == {"CUDA_VISIBLE_DEVICES": "1", "LOCAL_RANK": "0"} and gpu_env(5, 0) == {}

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    flags = ["up", "--model", "/m", "--prefill", "2", "--decode", "1", "--ep", "2", "--device", "cuda"]
    spec = cluster_spec(build_parser().parse_args([*flags, "--workdir", str(tmp_path)]))
    assert spec.gpu_count == 4
    cluster = LocalCluster(spec)
    envs: dict[str, dict[str, str]] = {}

    def spawn(name: str, args: list[str], extra_env: dict[str, str] | None = None) -> Proc:
        envs[name] = extra_env or {}
        return Proc(name, None, tmp_path / f"{name}.log")  # type: ignore[arg-type]

    monkeypatch.setattr(cluster, "_spawn", spawn)
    monkeypatch.setattr(cluster, "_wait_file", lambda proc, path, deadline: "8001 50052 50053")
    monkeypatch.setattr(cluster, "_wait_registered", lambda n, deadline: None)
    cluster.start()
    gpus = {name: env.get("CUDA_VISIBLE_DEVICES") for name, env in envs.items()}
    assert gpus == {
        "router": None,
        "prefill-0-ep0": "0",
        "prefill-0-ep1": "1",
        "prefill-1-ep0": "2",
        "prefill-1-ep1": "3",
        "decode-0-ep0": "0",
        "decode-0-ep1": "1",
    }
    with pytest.raises(ValueError, match="gpu_count"):
        dataclasses.replace(spec, gpu_count=-1)
