"""`k2serve plan`: the memory of one rank of a layout on a device (weights by kind, activations, KV per
token and per session, sessions that fit); exits 2, naming the numbers, when the layout does not fit."""

from __future__ import annotations

import argparse
import json
import sys

from k2serve.capacity.devices import GPUS, DeviceError, device
from k2serve.capacity.memory import (
    BUNDLED,
    CapacityError,
    Layout,
    RankPlan,
    Workload,
    gib,
    load_config,
    plan,
)
from k2serve.config import ConfigError

KV_DTYPES = {"bf16": 2, "fp8": 1, "fp32": 4}


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--model",
        required=True,
        help=f"a bundled config ({', '.join(sorted(BUNDLED))}) or a config.json / checkpoint directory",
    )
    s.add_argument("--device", required=True, choices=(*sorted(GPUS), "cpu"), help="cpu = this host's RAM")
    s.add_argument("--ep", type=int, default=1, help="expert-parallel ranks of one group")
    s.add_argument(
        "--attention-tp",
        type=int,
        default=1,
        help="ranks that split attention by heads (1 = DP attention: each rank its own sequences)",
    )
    s.add_argument("--redundant-experts", type=int, default=0, help="extra expert replicas per group")
    s.add_argument("--max-model-len", type=int, default=262_144)
    s.add_argument("--max-num-batched-tokens", type=int, default=8192)
    s.add_argument("--max-num-seqs", type=int, default=64)
    s.add_argument("--kv-cache-dtype", choices=tuple(KV_DTYPES), default="bf16")
    s.add_argument("--attention-tile", type=int, default=1024, help="context positions per attention tile")
    s.add_argument(
        "--memory-utilization", type=float, default=0.9, help="share of the device's memory to use"
    )
    s.add_argument("--json", action="store_true", help="one JSON object instead of the table")


def table(p: RankPlan, model: str, layout: Layout) -> str:
    attn = "DP attention" if layout.dp_attention else f"attention TP {layout.attention_tp}"
    rows = [
        ("model / device", f"{model} on {p.device_name}: EP {p.ranks}, {attn}"),
        ("device memory", f"{gib(p.device_bytes)} ({gib(p.usable_bytes)} usable)"),
        ("weights: dense (attn, MLP, shared)", gib(p.weights.dense)),
        ("weights: routed experts", gib(p.weights.routed_experts)),
        ("weights: embeddings+lm_head", gib(p.weights.embeddings)),
        ("weights: total", gib(p.weights.total)),
        ("activations (estimate)", gib(p.activations)),
        ("KV pool", gib(max(p.kv_pool_bytes, 0))),
        ("KV per token", f"{p.kv_per_token:,} B"),
        (f"KV per {p.max_model_len:,}-token session", gib(p.session_bytes)),
        ("KV tokens per rank", f"{p.kv_tokens:,}"),
        ("sessions per rank", str(p.sessions_per_rank)),
        (f"sessions per group of {p.ranks}", str(p.sessions_per_group)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def as_dict(p: RankPlan) -> dict[str, int | str | bool]:
    return {
        "device": p.device_name,
        "device_bytes": p.device_bytes,
        "usable_bytes": p.usable_bytes,
        "weights_dense_bytes": p.weights.dense,
        "weights_routed_experts_bytes": p.weights.routed_experts,
        "weights_embeddings_bytes": p.weights.embeddings,
        "weights_bytes": p.weights.total,
        "activation_bytes": p.activations,
        "kv_pool_bytes": p.kv_pool_bytes,
        "kv_bytes_per_token": p.kv_per_token,
        "session_bytes": p.session_bytes,
        "kv_tokens": p.kv_tokens,
        "sessions_per_rank": p.sessions_per_rank,
        "sessions_per_group": p.sessions_per_group,
        "fits": p.fits,
    }


def run(args: argparse.Namespace) -> int:
    try:
        layout = Layout(args.ep, args.attention_tp, args.redundant_experts)
        work = Workload(
            max_model_len=args.max_model_len,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            kv_bytes=KV_DTYPES[args.kv_cache_dtype],
            attention_tile=args.attention_tile,
        )
        dev = device(args.device)
        p = plan(load_config(args.model), dev.name, dev.memory_bytes, layout, work, args.memory_utilization)
    except (CapacityError, DeviceError, ConfigError) as e:
        print(f"k2serve plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(as_dict(p)) if args.json else table(p, args.model, layout))
    try:
        p.check()
    except CapacityError as e:
        print(f"k2serve plan: {e}", file=sys.stderr)
        return 2
    return 0
