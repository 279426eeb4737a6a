"""`k2serve bench engine`: the engine against transformers' `generate` and the decode roofline.

For each checkpoint (the `small` preset with bf16 experts, and with INT4 experts) and each batch size,
the same prompts (random token ids, `--input-len` each) go through k2serve's engine and through
`transformers.DeepseekV3ForCausalLM.generate` on the same weights, in the same process and run. The
roofline is the bytes of weights one batch-1 decode step must read, divided by the memory bandwidth
measured in this run (a streaming fp32 read), i.e. the fastest a step could possibly be.

Each engine is built once per batch size and warmed up on the timed shape (k2serve on the timed prompts
themselves, so `--compile decode` has compiled every bucket before timing); then `--rounds` timed runs
of each alternate (k2serve first in even rounds). Figures are medians with (min-max); the speedup is the
median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from k2serve.config import ModelConfig
from k2serve.extras import MissingExtraError

if TYPE_CHECKING:
    from k2serve.engine.llm import LLM


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Streaming read bandwidth in bytes/s: the best of `repeats` fp32 sums over `gib` GiB."""
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def decode_step_bytes(cfg: ModelConfig, dtype_bytes: int, int4_experts: bool, context: int) -> dict[str, int]:
    """Bytes a batch-1 decode step reads: every dense weight, the shared and top-k routed experts of each
    MoE layer, lm_head, one embedding row, and the latent KV of `context` positions."""
    counts = cfg.parameter_counts()
    h, e = cfg.hidden_size, 3 * cfg.hidden_size * cfg.moe_intermediate_size
    expert_bytes = e // 2 + (e // 32) * dtype_bytes if int4_experts else e * dtype_bytes
    routed = cfg.num_moe_layers * cfg.num_experts_per_tok * expert_bytes
    dense = counts["total"] - counts["routed_experts"] - cfg.vocab_size * h  # all but routed and embeddings
    router = cfg.num_moe_layers * cfg.n_routed_experts * h * 4  # fp32 gate weights
    kv = context * cfg.num_hidden_layers * cfg.kv_cache_dim * dtype_bytes
    total = dense * dtype_bytes + router + routed + h * dtype_bytes + kv
    return {"total": total, "routed_experts": routed, "dense": dense * dtype_bytes, "kv": kv}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def make_llm(
    model_dir: Path, max_num_seqs: int, max_prompt_len: int, dtype: torch.dtype, compile: str = "none"
) -> LLM:
    """The engine as the benchmarks run it: up to `max_num_seqs` sequences per step, a whole prompt of
    `max_prompt_len` tokens in one prefill chunk, and no prefix caching (a repeated prompt is recomputed,
    so rounds over the same prompts time the same work). `compile`: EngineConfig.compile ("decode": the
    captured decode step)."""
    from k2serve.engine.config import EngineConfig
    from k2serve.engine.llm import LLM

    cfg = EngineConfig(
        block_size=16,
        kv_cache_bytes=2 << 30,
        max_num_seqs=max(max_num_seqs, 1),
        max_num_batched_tokens=max(2048, max_prompt_len + 1),
        enable_prefix_caching=False,
        compile=compile,
    )
    return LLM(model_dir, dtype=dtype, engine_config=cfg)


class EngineRun:
    """k2serve's side: one engine built once for the batch, warmed up on the timed prompts themselves
    (so a `--compile decode` engine has compiled every bucket the timed run uses), then timed per round."""

    def __init__(
        self, model_dir: Path, prompts: list[list[int]], output_len: int, dtype: torch.dtype, compile: str
    ) -> None:
        from k2serve.engine.sampling_params import SamplingParams

        self.llm = make_llm(model_dir, len(prompts), len(prompts[0]), dtype, compile)
        self.prompts = prompts
        self.params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        t = time.perf_counter()
        self.run()
        self.warmup_s = time.perf_counter() - t

    def run(self) -> dict[str, Any]:
        t = time.perf_counter()
        outs = self.llm.generate(self.prompts, self.params)
        wall = time.perf_counter() - t
        total = sum(len(o.token_ids) for o in outs)
        return {
            "output_tok_s": total / wall,
            "wall_s": wall,
            "ttft_p50_ms": pct([o.metrics.ttft * 1e3 for o in outs], 50),
            "ttft_p99_ms": pct([o.metrics.ttft * 1e3 for o in outs], 99),
            "tpot_p50_ms": pct([o.metrics.tpot * 1e3 for o in outs], 50),
            "tpot_p99_ms": pct([o.metrics.tpot * 1e3 for o in outs], 99),
            "tokens": [o.token_ids for o in outs],
        }


class TransformersRun:
    """The baseline: `DeepseekV3ForCausalLM.generate` on the same weights, loaded once, warmed up on
    the timed shape, timed per round (time to the first token, then the whole generation)."""

    def __init__(
        self, model_dir: Path, prompts: list[list[int]], output_len: int, dtype: torch.dtype
    ) -> None:
        try:
            import transformers
        except ImportError as e:
            raise MissingExtraError("transformers", "hf", "the transformers baseline") from e

        cfg = ModelConfig.from_file(model_dir)
        hf_cfg = transformers.DeepseekV3Config(
            **{k: v for k, v in cfg.to_hf_dict().items() if k != "quantization_config"}
        )
        self.model = transformers.DeepseekV3ForCausalLM.from_pretrained(
            model_dir, config=hf_cfg, dtype=dtype
        ).eval()
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.max_length = None
        self.ids = torch.tensor(prompts)
        self.output_len = output_len
        self.kw = {
            "attention_mask": torch.ones_like(self.ids),
            "do_sample": False,
            "pad_token_id": cfg.pad_token_id,
        }
        with torch.inference_mode():  # warm-up: oneDNN builds its kernels for these row counts
            self.model.generate(self.ids, max_new_tokens=min(output_len, 4), **self.kw)

    def run(self) -> dict[str, Any]:
        with torch.inference_mode():
            t = time.perf_counter()
            self.model.generate(self.ids, max_new_tokens=1, **self.kw)
            ttft = time.perf_counter() - t
            t = time.perf_counter()
            out = self.model.generate(self.ids, max_new_tokens=self.output_len, **self.kw)
            wall = time.perf_counter() - t
        new = out[:, self.ids.shape[1] :]
        return {
            "output_tok_s": new.numel() / wall,
            "wall_s": wall,
            "ttft_ms": ttft * 1e3,
            "tpot_ms": (wall - ttft) / max(1, self.output_len - 1) * 1e3,
            "tokens": new.tolist(),
        }


def spread(xs: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a list of rates."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def paired_rounds(
    ours: Any, theirs: Any | None, rounds: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`rounds` timed runs of each, alternating which goes first (k2serve first in even rounds)."""
    a: list[dict[str, Any]] = []
    b: list[dict[str, Any]] = []
    for r in range(rounds):
        order = [(ours, a), (theirs, b)] if r % 2 == 0 else [(theirs, b), (ours, a)]
        for runner, out in order:
            if runner is not None:
                out.append(runner.run())
    return a, b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench engine", description=__doc__)
    ap.add_argument(
        "--model", action="append", help="checkpoint dir (repeatable); default: small bf16 + small int4"
    )
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "k2serve-bench"))
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each engine, alternating (medians)")
    ap.add_argument(
        "--compile",
        choices=("none", "decode"),
        default="none",
        help="k2serve's --compile (decode: the captured decode step, compiled in the warm-up)",
    )
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    dtype = getattr(torch, args.dtype)
    models = [Path(m) for m in args.model or []]
    if not models:
        from k2serve.model.checkpoint import write_checkpoint

        for quant in ("none", "int4"):
            d = Path(args.workdir) / f"small-{quant}"
            if not (d / "config.json").exists():
                print(f"writing the small preset ({quant}) to {d} ...", flush=True)
                write_checkpoint(d, "small", seed=0, quant=quant)
            models.append(d)
    torch.manual_seed(0)
    bw = measure_bandwidth()
    print(
        f"threads={torch.get_num_threads()}  streaming read bandwidth (fp32 sum, best of 5): {bw / 1e9:.1f} GB/s"
    )
    results = []
    for model_dir in models:
        cfg = ModelConfig.from_file(model_dir)
        int4 = cfg.quant is not None and cfg.quant.method == "int4"
        step = decode_step_bytes(cfg, torch.empty((), dtype=dtype).element_size(), int4, args.input_len)
        roof_ms = step["total"] / bw * 1e3
        print(
            f"\n== {model_dir.name}: {cfg.parameter_counts()['total'] / 1e6:.0f}M params, "
            f"{'INT4' if int4 else args.dtype} experts; batch-1 decode reads {step['total'] / 1e6:.1f} MB/step "
            f"-> roofline {roof_ms:.2f} ms/token ({1e3 / roof_ms:.0f} tok/s)"
        )
        for bs in (int(x) for x in args.batch_sizes.split(",")):
            prompts = torch.randint(0, cfg.vocab_size - 256, (bs, args.input_len)).tolist()
            engine = EngineRun(model_dir, prompts, args.output_len, dtype, args.compile)
            hf = (
                None
                if args.skip_transformers or int4
                else TransformersRun(model_dir, prompts, args.output_len, dtype)
            )
            ours_runs, hf_runs = paired_rounds(engine, hf, args.rounds)
            ours = ours_runs[0] | {
                k: statistics.median(r[k] for r in ours_runs)
                for k in (
                    "output_tok_s",
                    "wall_s",
                    "ttft_p50_ms",
                    "ttft_p99_ms",
                    "tpot_p50_ms",
                    "tpot_p99_ms",
                )
            }
            row: dict[str, Any] = {
                "model": model_dir.name,
                "int4": int4,
                "batch": bs,
                "compile": args.compile,
                "rounds": args.rounds,
                "roofline_ms": roof_ms,
                "warmup_s": engine.warmup_s,
                "k2serve": {k: v for k, v in ours.items() if k != "tokens"},
                "k2serve_tok_s": spread([r["output_tok_s"] for r in ours_runs]),
            }
            tok = row["k2serve_tok_s"]
            line = (
                f"batch {bs:3d}  k2serve: {tok['median']:8.1f} tok/s ({tok['min']:.1f}-{tok['max']:.1f})  TTFT p50/p99 "
                f"{ours['ttft_p50_ms']:.0f}/{ours['ttft_p99_ms']:.0f} ms  TPOT p50/p99 "
                f"{ours['tpot_p50_ms']:.1f}/{ours['tpot_p99_ms']:.1f} ms  (warm-up {engine.warmup_s:.1f} s)"
            )
            if bs == 1:
                row["roofline_fraction"] = roof_ms / ours["tpot_p50_ms"]
                line += f"  = {row['roofline_fraction']:.0%} of roofline"
            print(line, flush=True)
            if hf is not None:
                same = sum(a == b for a, b in zip(ours_runs[0]["tokens"], hf_runs[0]["tokens"], strict=True))
                ratios = [
                    o["output_tok_s"] / h["output_tok_s"] for o, h in zip(ours_runs, hf_runs, strict=True)
                ]
                theirs = spread([h["output_tok_s"] for h in hf_runs])
                row["transformers"] = {
                    k: statistics.median(h[k] for h in hf_runs)
                    for k in ("output_tok_s", "wall_s", "ttft_ms", "tpot_ms")
                }
                row["transformers_tok_s"] = theirs
                row["speedup"] = statistics.median(ratios)
                row["speedup_range"] = [min(ratios), max(ratios)]
                row["identical_greedy"] = same
                print(
                    f"           transformers: {theirs['median']:8.1f} tok/s ({theirs['min']:.1f}-{theirs['max']:.1f})  "
                    f"TTFT {row['transformers']['ttft_ms']:.0f} ms  TPOT {row['transformers']['tpot_ms']:.1f} ms  -> "
                    f"k2serve/transformers = {row['speedup']:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}, paired by round)  "
                    f"(identical greedy outputs: {same}/{bs})",
                    flush=True,
                )
            del engine, hf
            results.append(row)
    print("\nreproduce: k2serve bench engine " + " ".join(argv if argv is not None else sys.argv[3:]))
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_bytes_s": bw, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
