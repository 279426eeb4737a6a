"""`k2serve up` flags -> ClusterSpec (shared by the launchers: local processes, Ray actors) and RayOptions."""

from __future__ import annotations

import argparse
import os
from typing import Any

from k2serve.cluster.local import ClusterSpec
from k2serve.cluster.ray_plan import RayOptions
from k2serve.cluster.tls import TLSFiles


def engine_args_from_up(args: argparse.Namespace) -> tuple[str, ...]:
    """The engine flags `up` passes on to every worker."""
    out = [
        "--block-size",
        str(args.block_size),
        "--kv-cache-mb",
        str(args.kv_cache_mb),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
        "--max-waiting",
        str(args.max_waiting),
    ]
    if args.max_model_len:
        out += ["--max-model-len", str(args.max_model_len)]
    if args.no_prefix_caching:
        out.append("--no-prefix-caching")
    return tuple(out)


def spec_from_args(args: argparse.Namespace) -> ClusterSpec:
    """The cluster `k2serve up` describes (resolves --preset into a checkpoint under --workdir)."""
    from k2serve.cli import resolve_model

    return ClusterSpec(
        model_dir=resolve_model(args),
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        num_prefill=args.prefill,
        num_decode=args.decode,
        ep_size=args.ep,
        transfer_backend=args.transfer_backend,
        dtype=args.dtype,
        engine_args=engine_args_from_up(args),
        redis_url=args.redis_url or os.environ.get("REDIS_URL") or None,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        workdir=args.workdir,
        router_args=("--max-ttft-ms", str(args.max_ttft_ms)) if getattr(args, "max_ttft_ms", None) else (),
        tls=TLSFiles.from_args(args),
    )


def options_from_args(args: argparse.Namespace) -> RayOptions:
    """RayOptions from `k2serve up` flags; each flag is optional (its default when the CLI lacks it):
    --ray-cpus-per-rank (1), --ray-gpus-per-rank (0: Ray then leaves CUDA_VISIBLE_DEVICES alone),
    --ray-group-strategy (STRICT_PACK), --ray-max-restarts (3)."""

    def flag(name: str, default: Any) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    rank = {"CPU": float(flag("ray_cpus_per_rank", 1.0))}
    if gpus := float(flag("ray_gpus_per_rank", 0.0)):
        rank["GPU"] = gpus
    return RayOptions(
        rank_resources=rank,
        group_strategy=str(flag("ray_group_strategy", RayOptions.group_strategy)),
        max_restarts=int(flag("ray_max_restarts", RayOptions.max_restarts)),
    )
