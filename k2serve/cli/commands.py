"""The `k2serve` subcommands: each turns its parsed flags into settings (`k2serve.cli.settings`) and
runs its component, returning the exit status.

Each imports its component when it runs, not before (the only imports inside functions in the
package, for start-up time alone): `k2serve --help`, the planner's dry run and `bench serve` do not
load torch, and a worker process loads no HTTP stack.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import NoReturn

BENCHMARKS = {
    "engine": "k2serve.bench.engine",
    "transfer": "k2serve.bench.transfer",
    "ttft": "k2serve.bench.ttft",
    "load-memory": "k2serve.bench.load_memory",
    "serve": "k2serve.loadgen.cli",
    "sessions": "k2serve.bench.sessions",
    "interference": "k2serve.bench.interference",
    "int4-experts": "k2serve.bench.int4_experts",
    "moe-grouped": "k2serve.bench.moe_grouped",
    "tracing": "k2serve.bench.tracing",
    "tool-schemas": "k2serve.bench.tool_schemas",
    "long-context": "k2serve.bench.long_context",
    "long-neighbour": "k2serve.bench.long_neighbour",
    "spec-decode": "k2serve.bench.spec_decode",
    "kv-routing": "k2serve.bench.kv_routing",
    "kv-trace": "k2serve.bench.kv_trace",
    "kv-history": "k2serve.bench.kv_history",
    "kv-tiers": "k2serve.bench.kv_tiers",
    "device": "k2serve.bench.device",
    "captured": "k2serve.bench.captured",
    "moe-traffic": "k2serve.bench.moe_traffic",
    "demo": "k2serve.bench.demo_eval",
    "cpu-gemv": "k2serve.bench.cpu_gemv",
}


def init_model(args: argparse.Namespace) -> int:
    import torch

    from k2serve.model.checkpoint import write_checkpoint

    dtype = getattr(torch, args.dtype)
    out = write_checkpoint(args.dir, args.preset, seed=args.seed, quant=args.quant, dtype=dtype)
    print(f"wrote {args.preset} checkpoint (quant={args.quant}, seed={args.seed}) to {out}")
    return 0


def train_demo(args: argparse.Namespace) -> int:
    from k2serve.model.demo_data import COPY_DRILL_WEIGHTS, COPY_HEAVY_WEIGHTS
    from k2serve.model.demo_train import TrainConfig
    from k2serve.model.demo_train import train_demo as train

    cfg = TrainConfig(
        out_dir=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        num_samples=args.samples,
        seed=args.seed,
        threads=args.threads,
        max_minutes=args.max_minutes,
        warmup=args.warmup,
        keep_fp32=True,
        init_from=args.init_from,
        kind_weights=args.kind_weights
        or (COPY_DRILL_WEIGHTS if args.copy_drill else COPY_HEAVY_WEIGHTS if args.copy_heavy else None),
        weight_decay=args.weight_decay,
        varied_phrasings=args.phrasings == "varied",
    )
    train(cfg, log=lambda line: print(line, flush=True))
    return 0


def generate(args: argparse.Namespace) -> int:
    from k2serve.cli.settings import compile_mode
    from k2serve.engine.config import EngineConfig
    from k2serve.engine.llm import LLM
    from k2serve.engine.sampling_params import SamplingParams

    llm = LLM(
        args.model,
        dtype=args.dtype,
        engine_config=EngineConfig(
            attention_backend=args.attention_backend,
            moe_backend=args.moe_backend,
            device=args.device,
            compile=compile_mode(args),
        ),
        speculative_config=args.speculative_config,
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    prompts: list[str | list[int]] = [args.prompt] if args.prompt is not None else [args.prompt_ids]
    for out in llm.generate(prompts, params):
        if args.json:
            print(
                json.dumps({"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason})
            )
        else:
            print(out.text)
            print(
                f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}, "
                f"ttft={out.metrics.ttft * 1e3:.1f} ms, tpot={out.metrics.tpot * 1e3:.1f} ms]",
                file=sys.stderr,
            )
    return 0


def serve(args: argparse.Namespace) -> int:
    from k2serve.api.serve import serve as run
    from k2serve.cli.settings import serve_settings

    return run(serve_settings(args))


def exit_now(status: int) -> NoReturn:
    """End a server process that has stopped cleanly (its requests drained, its sockets closed, its
    stores closed) without tearing the interpreter down: freeing the tokenizer's and the model's
    millions of objects one by one took the router seconds (of a 30 s grace period) and did nothing."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def router(args: argparse.Namespace) -> int:
    from k2serve.cli.settings import router_settings
    from k2serve.router.main import main

    exit_now(main(router_settings(args)))


def prefill(args: argparse.Namespace) -> int:
    from k2serve.cli.settings import worker_settings
    from k2serve.prefill.main import main

    exit_now(main(worker_settings("prefill", args)))


def decode(args: argparse.Namespace) -> int:
    from k2serve.cli.settings import worker_settings
    from k2serve.decode.main import main

    exit_now(main(worker_settings("decode", args)))


def up(args: argparse.Namespace) -> int:
    from k2serve.cli.settings import cluster_spec, ray_options

    spec = cluster_spec(args)
    if args.ray:
        if spec.mooncake_master:
            raise ValueError(
                "--ray with --kv-store mooncake needs --kv-store-master: `up --ray` runs no master"
            )
        from k2serve.cluster.ray_runtime import run_on_ray

        return run_on_ray(spec, args.ray, ray_options(args))
    from k2serve.cluster.local import run_local

    return run_local(spec)


def planner(args: argparse.Namespace) -> int:
    from k2serve.planner.cli import run

    return run(args)


def plan(args: argparse.Namespace) -> int:
    from k2serve.cli.plan import run

    return run(args)


def bench(args: argparse.Namespace) -> int:
    return int(importlib.import_module(BENCHMARKS[args.what]).main(args.rest) or 0)
