"""Routed experts as grouped GEMMs against the loop over experts: one MoE layer, and one decode step.

Run: `k2serve bench moe-grouped [--preset small] [--batch-sizes 1,8,32,64,128] [--dtype bfloat16]
[--rounds 30] [--step-rounds 6] [--no-step] [--static]`.

--static: the captured decode step's routed experts instead (`bench_static`): gathered GEMVs
(model/compiled_gemv.py) against the grouped GEMM, both compiled by Inductor.

MoE layer: one `MoE` of the preset's shape (router, 64 routed experts, shared expert; random weights),
x [B, D] random, so B tokens x top-k rows reach the routed experts; both paths (`RoutedExperts.run_grouped`
and `RoutedExperts.run_loop`, chosen by setting `moe.GROUPED_MIN_ROWS` to 0 or to a huge value) are timed
back to back in every round, the order reversed every other round; figures are medians of each path's
times and of the per-round ratio grouped / loop.

Decode step: an `LLMEngine` on the preset's random checkpoint (written under --root on first use) with B
requests of 16-token prompts, stepped until every request decodes; then alternately one step with each
path (the same paired rounds). Each step decodes B tokens at its own position, so the steps differ only
in the path (and by one token of context per round).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import k2serve.model.moe as moe_mod
from k2serve.config import ModelConfig
from k2serve.model.moe import MoE
from k2serve.model.presets import PRESETS

LOOP = 1 << 60  # a GROUPED_MIN_ROWS no call reaches: the loop everywhere


def with_threshold(threshold: int, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with moe.GROUPED_MIN_ROWS set to `threshold` (restored afterwards)."""

    def run() -> object:
        saved = moe_mod.GROUPED_MIN_ROWS
        moe_mod.GROUPED_MIN_ROWS = threshold
        try:
            return fn()
        finally:
            moe_mod.GROUPED_MIN_ROWS = saved

    return run


def time_paired(grouped: Callable[[], object], loop: Callable[[], object], rounds: int) -> dict[str, float]:
    """Medians (ms) of both paths and of the per-round ratio grouped / loop, alternating order."""
    tg: list[float] = []
    tl: list[float] = []
    for r in range(rounds):
        for which in ("g", "l") if r % 2 == 0 else ("l", "g"):
            t0 = time.perf_counter()
            (grouped if which == "g" else loop)()
            (tg if which == "g" else tl).append(time.perf_counter() - t0)
    return {
        "grouped_ms": statistics.median(tg) * 1e3,
        "loop_ms": statistics.median(tl) * 1e3,
        "grouped_over_loop": statistics.median(g / lo for g, lo in zip(tg, tl, strict=True)),
    }


def random_moe(config: ModelConfig, dtype: torch.dtype, seed: int = 0) -> MoE:
    """One MoE layer of `config`'s shape with random weights (router biases too) in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    layer = MoE(config, dtype=dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        layer.gate.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts, generator=g) * 0.01)
    if layer.shared_experts is not None:
        layer.shared_experts.to(dtype)
    return layer


def bench_layer(config: ModelConfig, dtype: torch.dtype, batches: Sequence[int], rounds: int) -> list[dict]:
    layer = random_moe(config, dtype)
    out = []
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, config.hidden_size).to(dtype)
            step = functools.partial(layer, x)
            grouped, loop = with_threshold(0, step), with_threshold(LOOP, step)
            time_paired(grouped, loop, 3)  # warm-up
            out.append({"batch": b} | time_paired(grouped, loop, rounds))
    return out


def bench_static(config: ModelConfig, dtype: torch.dtype, batches: Sequence[int], rounds: int) -> list[dict]:
    """The captured step's static routed experts (`RoutedExperts.forward_static`), compiled by Inductor
    twice: with the gathered expert GEMVs (`compiled_gemv.options(True)`, where B * k rows are within
    GATHER_MAX_ROWS) and with the grouped GEMM (off); same routing, paired rounds."""
    from k2serve.model import compiled_gemv

    moe = random_moe(config, dtype)
    step = torch.compile(moe.experts.forward_static, dynamic=False, fullgraph=True)
    out = []
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, config.hidden_size).to(dtype)
            weights, ids = moe.gate(x)

            def run(
                on: bool, x: torch.Tensor = x, w: torch.Tensor = weights, i: torch.Tensor = ids
            ) -> object:
                with compiled_gemv.options(on):
                    return step(x, w, i)

            gathered, grouped = functools.partial(run, True), functools.partial(run, False)
            t = time_paired(gathered, grouped, 3)  # compiles both, then warm-up
            t = time_paired(gathered, grouped, rounds)
            out.append(
                {"batch": b, "gathered_ms": t["grouped_ms"], "grouped_ms": t["loop_ms"]}
                | {"gathered_over_grouped": t["grouped_over_loop"]}
            )
    return out


def bench_step(
    root: Path, preset: str, dtype: torch.dtype, batches: Sequence[int], rounds: int
) -> list[dict]:
    from k2serve.engine.config import EngineConfig
    from k2serve.engine.llm_engine import LLMEngine
    from k2serve.engine.sampling_params import SamplingParams
    from k2serve.model.checkpoint import preset_checkpoint

    ckpt = preset_checkpoint(root, preset)
    out = []
    for b in batches:
        cfg = EngineConfig(
            block_size=16, kv_cache_bytes=1 << 30, max_num_seqs=b, max_num_batched_tokens=max(2048, 16 * b)
        )
        engine = LLMEngine.from_pretrained(ckpt, dtype, cfg)
        params = SamplingParams(temperature=0.0, max_tokens=4 * rounds + 16, ignore_eos=True)
        g = torch.Generator().manual_seed(b)
        for k in range(b):
            prompt = torch.randint(10, 1000, (16,), generator=g).tolist()
            engine.add_request(f"r{k}", prompt, params)
        for _ in range(4):  # prefill, then warm-up decode steps
            engine.step()
        grouped = with_threshold(0, engine.step)
        loop = with_threshold(LOOP, engine.step)
        time_paired(grouped, loop, 2)
        out.append({"batch": b} | time_paired(grouped, loop, rounds))
        del engine
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench moe-grouped", description=__doc__)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--batch-sizes", default="1,8,32,64,128")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=30, help="paired rounds per batch size, MoE layer")
    ap.add_argument("--step-rounds", type=int, default=6, help="paired rounds per batch size, decode step")
    ap.add_argument("--no-step", action="store_true", help="time the MoE layer only")
    ap.add_argument(
        "--static",
        action="store_true",
        help="instead: the captured step's static experts compiled, gathered GEMVs vs grouped GEMM",
    )
    ap.add_argument(
        "--root",
        default=str(Path(tempfile.gettempdir()) / "k2serve-bench"),
        help="where the random checkpoint is kept",
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    config = ModelConfig.from_dict(PRESETS[args.preset])
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    print(
        f"{args.preset}: D={config.hidden_size} I={config.moe_intermediate_size} "
        f"E={config.n_routed_experts} top-{config.num_experts_per_tok}, {args.dtype}, "
        f"threads={torch.get_num_threads()}, GROUPED_MIN_ROWS in use: {moe_mod.GROUPED_MIN_ROWS}"
    )
    if args.static:
        static = bench_static(config, dtype, batches, args.rounds)
        print(f"static experts compiled, {args.rounds} paired rounds")
        print(f"{'batch':>6} {'rows':>6} {'grouped ms':>11} {'gathered ms':>12} {'gathered/grouped':>17}")
        for r in static:
            rows = r["batch"] * config.num_experts_per_tok
            print(
                f"{r['batch']:6d} {rows:6d} {r['grouped_ms']:11.2f} {r['gathered_ms']:12.2f} "
                f"{r['gathered_over_grouped']:17.2f}"
            )
        if args.json:
            Path(args.json).write_text(json.dumps({"static": static}, indent=1))
        return 0
    results: dict[str, Any] = {"layer": bench_layer(config, dtype, batches, args.rounds)}
    print(f"MoE layer, {args.rounds} paired rounds")
    print(f"{'batch':>6} {'rows':>6} {'loop ms':>9} {'grouped ms':>11} {'grouped/loop':>13}")
    for r in results["layer"]:
        rows = r["batch"] * config.num_experts_per_tok
        print(
            f"{r['batch']:6d} {rows:6d} {r['loop_ms']:9.2f} {r['grouped_ms']:11.2f} "
            f"{r['grouped_over_loop']:13.2f}"
        )
    if not args.no_step:
        results["step"] = bench_step(Path(args.root), args.preset, dtype, batches, args.step_rounds)
        print(f"decode step ({config.num_hidden_layers} layers), {args.step_rounds} paired rounds")
        print(f"{'batch':>6} {'loop ms':>9} {'grouped ms':>11} {'grouped/loop':>13}")
        for r in results["step"]:
            print(
                f"{r['batch']:6d} {r['loop_ms']:9.2f} {r['grouped_ms']:11.2f} {r['grouped_over_loop']:13.2f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
