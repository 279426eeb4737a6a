"""Parsed flags -> the typed, frozen settings each component takes. The only place that reads an
`argparse.Namespace` or the environment for them.

The flags are `k2serve.cli.parser`'s; each function names the flags it reads. `cluster_spec` is what
`k2serve up` hands both launchers (local processes, Ray actors), so they start the same processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path
from typing import Any

from k2serve.api.settings import ServeSettings
from k2serve.cluster.local import ClusterSpec
from k2serve.cluster.ray_plan import RayOptions, gpus_per_rank
from k2serve.engine.config import EngineConfig, SpeculativeConfig
from k2serve.experts.comm import EPConfigError
from k2serve.experts.eplb import EPLBConfig
from k2serve.model.checkpoint import preset_checkpoint
from k2serve.router.settings import RouterSettings
from k2serve.rpc.auth import InternalAuth, read_token_file
from k2serve.rpc.tls import TLSConfigError, TLSFiles
from k2serve.sessions.connection import RedisConnection
from k2serve.tracing.settings import TracingSettings
from k2serve.worker.settings import WorkerSettings

API_KEY_ENV = "K2SERVE_API_KEY"
CLUSTER_TOKEN_FILE_ENV = "K2SERVE_CLUSTER_TOKEN_FILE"  # noqa: S105 - names a file, holds no secret
HOME_ENV = "K2SERVE_HOME"  # where --preset checkpoints are kept (default ~/.cache/k2serve)


def model_dir(args: argparse.Namespace) -> str:
    """The checkpoint directory: --model, or the --preset checkpoint with --seed (written once under
    --workdir, $K2SERVE_HOME or ~/.cache/k2serve, then reused)."""
    if getattr(args, "model", None):
        return str(args.model)
    root = getattr(args, "workdir", None) or os.environ.get(HOME_ENV) or Path.home() / ".cache" / "k2serve"
    return str(preset_checkpoint(root, args.preset, args.seed))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the engine flags (`add_engine_args`) describe."""
    return EngineConfig(
        block_size=args.block_size,
        kv_cache_bytes=None if args.kv_cache_mb is None else args.kv_cache_mb << 20,
        memory_budget_bytes=None if args.memory_budget_mb is None else args.memory_budget_mb << 20,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        max_waiting=args.max_waiting,
        kv_cache_dtype=args.kv_cache_dtype,
        speculative_config=SpeculativeConfig.parse(getattr(args, "speculative_config", None)),
        attention_backend=args.attention_backend,
        kv_offload_host_bytes=args.kv_offload_host_mb << 20,
        kv_offload_dir=args.kv_offload_dir,
        kv_offload_disk_bytes=args.kv_offload_disk_mb << 20,
        kv_offload_async=args.kv_offload_async,
        kv_reload_timeout_s=args.kv_reload_timeout_s,
        kv_session_lease_s=args.kv_session_lease_s,
        kv_store=args.kv_store,
        kv_store_master=args.kv_store_master,
        kv_store_metadata=args.kv_store_metadata,
        kv_store_segment_bytes=args.kv_store_segment_mb << 20,
        kv_store_put_on_compute=args.kv_store_put_on_compute,
        kv_store_local_hostname=args.kv_store_local_hostname,
        device=args.device,
        moe_backend=args.moe_backend,
        compile=compile_mode(args),
    )


def compile_mode(args: argparse.Namespace) -> str:
    """EngineConfig.compile from --compile / --enforce-eager (vLLM's alias for none); with "decode" the
    captured step's compile progress ("compiling decode step for batch 8 ... 12.3 s") goes to stderr
    also in commands that configure no logging (generate, serve)."""
    mode = "none" if getattr(args, "enforce_eager", False) else getattr(args, "compile", "none")
    progress = logging.getLogger("k2serve.engine.captured")
    if mode == "decode" and not progress.handlers and not logging.getLogger().handlers:
        progress.addHandler(logging.StreamHandler())
        progress.setLevel(logging.INFO)
    return mode


def tls_files(args: argparse.Namespace) -> TLSFiles | None:
    """This process's TLS files from --tls-cert/--tls-key (and --tls-ca/--tls-server-name where the
    command has them); None (plaintext) when no TLS flag is given. The CA and the server name need
    the pair: with TLS every process both serves and dials over TLS."""
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    ca, name = getattr(args, "tls_ca", None), getattr(args, "tls_server_name", None)
    if cert is None and key is None:
        if ca is not None or name is not None:
            raise TLSConfigError(
                "--tls-ca / --tls-server-name need --tls-cert and --tls-key (this process's "
                "certificate): with TLS every process both serves and dials over TLS",
                ca or name,
            )
        return None
    if cert is None or key is None:
        raise TLSConfigError("--tls-cert and --tls-key go together", cert or key)
    return TLSFiles(cert, key, ca, name)


def redis_connection(args: argparse.Namespace) -> RedisConnection | None:
    """The session store from --redis-url ($REDIS_URL) and --redis-password-file
    ($REDIS_PASSWORD_FILE), --redis-ca, --redis-cert, --redis-key; None without a URL."""
    url = args.redis_url or os.environ.get("REDIS_URL") or None
    password_file = args.redis_password_file or os.environ.get("REDIS_PASSWORD_FILE") or None
    tls = (args.redis_ca, args.redis_cert, args.redis_key)
    if url is None:
        if args.redis_password_file or any(tls):
            raise ValueError(
                "--redis-password-file / --redis-ca / --redis-cert / --redis-key need --redis-url"
            )
        return None
    return RedisConnection(url, password_file, *tls)


def tracing_settings(role: str, args: argparse.Namespace) -> TracingSettings | None:
    """Where a `role` process sends spans: --otlp-traces-endpoint, else the OTEL_* variables; None: off."""
    return TracingSettings.resolve(role, getattr(args, "otlp_traces_endpoint", None), os.environ)


def internal_auth(args: argparse.Namespace, tls: TLSFiles | None) -> InternalAuth:
    """The cluster credential of a router or worker: the token in --cluster-token-file (default
    $K2SERVE_CLUSTER_TOKEN_FILE), mutual TLS when --tls-ca is given, or --insecure-internal; with
    none of them AuthConfigError says what to pass."""
    path = getattr(args, "cluster_token_file", None) or os.environ.get(CLUSTER_TOKEN_FILE_ENV) or None
    return InternalAuth(
        token=read_token_file(path) if path else None,
        mtls=tls is not None and tls.mutual,
        insecure=bool(getattr(args, "insecure_internal", False)),
    )


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """`k2serve serve`: model, engine and API flags; the API key defaults to $K2SERVE_API_KEY."""
    return ServeSettings(
        model_dir=model_dir(args),
        engine=engine_config(args),
        model_name=args.served_model_name,
        dtype=args.dtype,
        host=args.host,
        port=args.port,
        api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


def eplb_config(args: argparse.Namespace) -> EPLBConfig | None:
    """--enable-eplb [--eplb-config JSON] -> the EPLB settings (None: off). EPConfigError (a ValueError)
    names a bad JSON key or value, or --eplb-config without --enable-eplb."""
    if not args.enable_eplb:
        if args.eplb_config is not None:
            raise EPConfigError("--eplb-config needs --enable-eplb", args.eplb_config)
        return None
    return EPLBConfig() if args.eplb_config is None else EPLBConfig.from_json(args.eplb_config)


def worker_settings(role: str, args: argparse.Namespace) -> WorkerSettings:
    """`k2serve prefill|decode`: model, engine and worker flags. The worker id defaults to
    <role>-<host>-<pid>; a rank of an expert-parallel group appends -ep<rank>."""
    directory = model_dir(args)
    tls = tls_files(args)
    worker_id = args.worker_id or f"{role}-{socket.gethostname()}-{os.getpid()}"
    if args.ep > 1:
        worker_id += f"-ep{args.ep_rank}"
    return WorkerSettings(
        role=role,
        model_dir=directory,
        model_name=args.served_model_name or Path(directory).resolve().name,
        dtype=args.dtype,
        engine=engine_config(args),
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        router=args.router,
        worker_id=worker_id,
        transfer_backend=args.transfer_backend,
        transfer_port=args.transfer_port,
        metrics_port=args.metrics_port,
        heartbeat_interval_s=args.heartbeat_interval,
        ready_file=args.ready_file,
        ep_size=args.ep,
        ep_rank=args.ep_rank,
        ep_init=args.ep_init,
        ep_timeout_s=args.ep_timeout,
        eplb=eplb_config(args),
        tls=tls,
        tracing=tracing_settings(role, args),
        internal=internal_auth(args, tls),
    )


def router_settings(args: argparse.Namespace) -> RouterSettings:
    """`k2serve router`: static --worker ROLE=HOST:PORT entries, the API key ($K2SERVE_API_KEY by
    default), the session store ($REDIS_URL by default) and admission limits."""
    for w in args.worker:
        if "=" not in w:
            raise ValueError(f"--worker {w}: expected prefill=HOST:PORT or decode=HOST:PORT")
    workers = tuple((role, address) for role, address in (w.split("=", 1) for w in args.worker))
    tls = tls_files(args)
    return RouterSettings(
        model_dir=args.model,
        model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        internal_port=args.internal_port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        static_workers=workers,
        heartbeat_timeout_s=args.heartbeat_timeout,
        max_queue=args.max_queue,
        max_ttft_s=args.max_ttft_ms / 1e3 if args.max_ttft_ms else None,
        tls=tls,
        redis=redis_connection(args),
        ready_file=getattr(args, "ready_file", None),
        tracing=tracing_settings("router", args),
        internal=internal_auth(args, tls),
        routing_policy=args.routing_policy,
        kv_index_max_blocks=args.kv_index_max_blocks,
        routing_log=args.routing_log,
    )


def engine_args_from_up(args: argparse.Namespace) -> tuple[str, ...]:
    """The engine flags `up` passes on to every worker."""
    out = [
        "--block-size",
        str(args.block_size),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
        "--max-waiting",
        str(args.max_waiting),
        "--kv-cache-dtype",
        args.kv_cache_dtype,
        "--attention-backend",
        args.attention_backend,
        "--moe-backend",
        args.moe_backend,
        "--compile",
        compile_mode(args),
    ]
    if args.device is not None:
        out += ["--device", args.device]
    if args.kv_cache_mb is not None:
        out += ["--kv-cache-mb", str(args.kv_cache_mb)]
    if args.memory_budget_mb is not None:
        out += ["--memory-budget-mb", str(args.memory_budget_mb)]
    if args.max_model_len:
        out += ["--max-model-len", str(args.max_model_len)]
    if args.no_prefix_caching:
        out.append("--no-prefix-caching")
    if args.kv_offload_host_mb:
        out += ["--kv-offload-host-mb", str(args.kv_offload_host_mb)]
    if args.kv_offload_dir:
        out += ["--kv-offload-dir", args.kv_offload_dir]
    if args.kv_offload_disk_mb:
        out += ["--kv-offload-disk-mb", str(args.kv_offload_disk_mb)]
    if not args.kv_offload_async:
        out.append("--no-kv-offload-async")
    if args.kv_reload_timeout_s != 10.0:
        out += ["--kv-reload-timeout-s", str(args.kv_reload_timeout_s)]
    if args.kv_session_lease_s:
        out += ["--kv-session-lease-s", str(args.kv_session_lease_s)]
    out += kv_store_args_from_up(args)
    if getattr(args, "speculative_config", None):
        out += ["--speculative-config", args.speculative_config]
    return tuple(out)


def kv_store_args_from_up(args: argparse.Namespace) -> list[str]:
    """The --kv-store* flags `up` passes on (without --kv-store-master, LocalCluster starts a local
    mooncake_master and adds its address)."""
    if args.kv_store == "none":
        return []
    out = ["--kv-store", args.kv_store, "--kv-store-segment-mb", str(args.kv_store_segment_mb)]
    for flag, value in (
        ("--kv-store-master", args.kv_store_master),
        ("--kv-store-metadata", args.kv_store_metadata),
        ("--kv-store-local-hostname", args.kv_store_local_hostname),
    ):
        if value:
            out += [flag, value]
    if not args.kv_store_put_on_compute:
        out.append("--no-kv-store-put-on-compute")
    return out


def router_args_from_up(args: argparse.Namespace) -> tuple[str, ...]:
    """The router flags `up` passes on: --max-ttft-ms and a --routing-policy other than the default."""
    out: tuple[str, ...] = ()
    if getattr(args, "max_ttft_ms", None):
        out += ("--max-ttft-ms", str(args.max_ttft_ms))
    policy = getattr(args, "routing_policy", None)
    if policy is not None and policy != "kv":
        out += ("--routing-policy", policy)
    return out


def cluster_spec(args: argparse.Namespace) -> ClusterSpec:
    """The cluster `k2serve up` describes (resolves --preset into a checkpoint under --workdir)."""
    return ClusterSpec(
        model_dir=model_dir(args),
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        internal_port=args.internal_port,
        num_prefill=args.prefill,
        num_decode=args.decode,
        ep_size=args.ep,
        eplb_config=None if (eplb := eplb_config(args)) is None else eplb.to_json(),
        transfer_backend=args.transfer_backend,
        dtype=args.dtype,
        engine_args=engine_args_from_up(args),
        redis=redis_connection(args),
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        workdir=args.workdir,
        router_args=router_args_from_up(args),
        tls=tls_files(args),
        otlp_traces_endpoint=getattr(args, "otlp_traces_endpoint", None),
        cluster_token_file=args.cluster_token_file,
        gpu_count=gpus_to_spread(args.device),
        mooncake_master=args.kv_store == "mooncake" and not args.kv_store_master,
    )


def gpus_to_spread(device: str | None) -> int:
    """How many GPUs `up` spreads its worker processes over: all the GPUs torch sees when the workers
    run on CUDA without a fixed index (`--device cuda`, or the default on a GPU host) and there are
    several; 0 (no pinning) on CPU, on one GPU, or for an explicit `cuda:N`, which the user chose."""
    if device not in (None, "cuda"):
        return 0
    import torch

    count = torch.cuda.device_count()
    return count if count > 1 else 0


def ray_options(args: argparse.Namespace) -> RayOptions:
    """RayOptions from `k2serve up` flags; each flag is optional (its default when the CLI lacks it):
    --ray-cpus-per-rank (1), --ray-gpus-per-rank (default 1 with --device cuda, else 0: Ray then leaves
    CUDA_VISIBLE_DEVICES alone),
    --ray-group-strategy (STRICT_PACK), --ray-max-restarts (3)."""

    def flag(name: str, default: Any) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    rank = {"CPU": float(flag("ray_cpus_per_rank", 1.0))}
    if gpus := gpus_per_rank(getattr(args, "device", None), getattr(args, "ray_gpus_per_rank", None)):
        rank["GPU"] = gpus
    return RayOptions(
        rank_resources=rank,
        group_strategy=str(flag("ray_group_strategy", RayOptions.group_strategy)),
        max_restarts=int(flag("ray_max_restarts", RayOptions.max_restarts)),
    )
