"""CPU linear layers at small batch: which kernel reads the weights fastest, against the roofline.

Run: `k2serve bench cpu-gemv [--shapes small,k2] [--batches 1,8,32] [--threads 1,2] [--repeats 30]`.

For each weight shape (the `small` preset's and K2's linear layers) and batch it times, in paired
alternating rounds (every round runs every path once, order reversed every other round):

- `bf16`: `F.linear` on a bf16 weight (what the model runs today);
- `fp32`: `F.linear` on the same weight upcast to fp32 (twice the bytes, MKL's sgemv/sgemm);
- `mkldnn`: oneDNN with the weight prepacked once (`mkldnn._reorder_linear_weight`, then
  `mkldnn._linear_pointwise`): what Inductor's freezing does to a bf16 linear;
- `int8`: weight-only int8 with per-channel scales (`aten._weight_int8pack_mm`, bf16 activations);
  lossy, an option only;
- `int4`: group-32 weight-only int4 in torch's CPU tiles (`aten._weight_int4pack_mm_for_cpu`): the
  kernel the INT4 routed experts run at small batch (`RoutedExperts.swiglu_int4_fused`);
- `native`: k2serve's own AVX512-BF16 GEMV (`cpu_kernels.linear_bf16`, on the dense weight): what the
  captured step's one-row linears run where it is available (timed only there).

GB/s counts the weight bytes each path reads (bf16 2 per weight, fp32 4, int8 1 plus a scale per
row, int4 a half plus a scale and zero point per 32) over the median time; activations are noise.
The roofline is this host's streaming read, measured in the same run by summing a tensor much
larger than the last-level cache share (and a copy, reads plus writes). The host is shared: each
figure is a median with its interquartile range, and the table says the 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from k2serve.bench.engine import make_llm
from k2serve.bench.int4_experts import time_paired
from k2serve.config import ModelConfig
from k2serve.model import cpu_kernels
from k2serve.model.checkpoint import write_checkpoint
from k2serve.model.presets import PRESETS

GROUP = 32
PATHS = ("bf16", "fp32", "mkldnn", "int8", "int4", "native")


def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """The (out, in) shape of each kind of linear layer of `config` (one routed expert's w13 and w2)."""
    h, heads = config.hidden_size, config.num_attention_heads
    q_rank = config.q_lora_rank or h  # no q LoRA: q_proj, [heads * qk, h]; listed as q_a_proj
    return {
        "q_a_proj": (q_rank, h),
        "q_b_proj": (heads * config.qk_head_dim, q_rank),
        "kv_a_proj": (config.kv_lora_rank + config.qk_rope_head_dim, h),
        "o_proj": (h, heads * config.v_head_dim),
        "dense_gate_up": (2 * config.intermediate_size, h),
        "dense_down": (h, config.intermediate_size),
        "expert_w13": (2 * config.moe_intermediate_size, h),
        "expert_w2": (h, config.moe_intermediate_size),
        "lm_head": (config.vocab_size, h),
    }


# K2 (hidden 7168) from its published config: the shapes that fit a time-boxed run on a shared host.
K2_SHAPES = {
    "q_a_proj": (1536, 7168),
    "kv_a_proj": (576, 7168),
    "expert_w13": (4096, 7168),
    "expert_w2": (7168, 2048),
}


def shape_sets(names: list[str]) -> dict[str, tuple[int, int]]:
    """`small` (or another preset's) and `k2` shapes by name, keys "<set>.<layer>"."""
    out: dict[str, tuple[int, int]] = {}
    for name in names:
        shapes = K2_SHAPES if name == "k2" else layer_shapes(ModelConfig.from_dict(PRESETS[name]))
        out |= {f"{name}.{layer}": s for layer, s in shapes.items()}
    return out


def weight_bytes(path: str, out_f: int, in_f: int) -> int:
    """Bytes of weight (and scales) that `path` reads per call."""
    n = out_f * in_f
    return {
        "bf16": 2 * n,
        "fp32": 4 * n,
        "mkldnn": 2 * n,
        "native": 2 * n,
        "int8": n + 2 * out_f,
        "int4": n // 2 + 2 * 2 * out_f * (in_f // GROUP),
    }[path]


def path_calls(
    w: torch.Tensor, x: torch.Tensor, paths: tuple[str, ...]
) -> dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor]]:
    """Per path: a no-argument call computing x @ w.T for bf16 x [batch, in] and weight w [out, in],
    and the weight that path computes with, dense fp32 [out, in] (so its error can be checked)."""
    out_f, in_f = w.shape
    batch = x.shape[0]
    calls: dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor]] = {}
    if "bf16" in paths:
        calls["bf16"] = (lambda: F.linear(x, w), w.float())
    if "fp32" in paths:
        wf, xf = w.float(), x.float()
        calls["fp32"] = (lambda: F.linear(xf, wf), wf)
    if "mkldnn" in paths:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, batch)  # noqa: SLF001
        calls["mkldnn"] = (
            lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], ""),  # noqa: SLF001
            w.float(),
        )
    if "native" in paths and cpu_kernels.available():
        calls["native"] = (lambda: cpu_kernels.linear_bf16(x, w), w.float())
    if "int8" in paths:
        scale = (w.float().abs().amax(1) / 127).clamp_min(1e-12)
        q = torch.round(w.float() / scale[:, None]).to(torch.int8)
        s16 = scale.to(torch.bfloat16)
        calls["int8"] = (
            lambda: torch.ops.aten._weight_int8pack_mm(x, q, s16),  # noqa: SLF001
            q.float() * s16.float()[:, None],
        )
    if "int4" in paths and in_f % GROUP == 0:
        from k2serve.model.quant import quantize_int4

        q4, scale4 = quantize_int4(w.float(), GROUP)
        u = (q4.to(torch.int32) + 8).contiguous()
        packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 2)
        sz = torch.zeros(in_f // GROUP, out_f, 2, dtype=torch.bfloat16)
        sz[..., 0] = scale4.t()
        dense4 = (q4.float().view(out_f, -1, GROUP) * sz[..., 0].t().float().unsqueeze(-1)).view(out_f, in_f)
        calls["int4"] = (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed4, GROUP, sz), dense4)
    return calls


def spread(ts: list[float]) -> tuple[float, float, float]:
    """(median, 25th, 75th percentile) of `ts`."""
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return statistics.median(ts), q[0], q[2]


def roofline(mib: int = 512, repeats: int = 9) -> dict[str, float]:
    """Streaming read (sum of an fp32 tensor of `mib` MiB) and copy GB/s, median of `repeats`."""
    a = torch.ones(mib * 2**20 // 4)
    b = torch.empty_like(a)
    nbytes = a.numel() * 4
    t_sum, t_copy = time_paired((a.sum, lambda: b.copy_(a)), repeats)
    return {
        "read_gbps": nbytes / statistics.median(t_sum) / 1e9,
        "copy_gbps": 2 * nbytes / statistics.median(t_copy) / 1e9,
    }


def measure(
    shapes: dict[str, tuple[int, int]],
    batches: list[int],
    threads: list[int],
    repeats: int,
    paths: tuple[str, ...] = PATHS,
) -> list[dict]:
    """One row per (threads, shape, batch, path): median µs, IQR, GB/s of weight bytes."""
    rows = []
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for nt in threads:
            torch.set_num_threads(nt)
            for name, (out_f, in_f) in shapes.items():
                w = (torch.randn(out_f, in_f, generator=g) * 0.02).to(torch.bfloat16)
                for batch in batches:
                    x = torch.randn(batch, in_f, generator=g).to(torch.bfloat16)
                    calls = path_calls(w, x, paths)
                    names = list(calls)
                    fns = [calls[p][0] for p in names]
                    time_paired(fns, 3)  # warm-up
                    times = time_paired(fns, repeats)
                    for p, ts in zip(names, times, strict=True):
                        med, q1, q3 = spread(ts)
                        rows.append(
                            {
                                "threads": nt,
                                "shape": name,
                                "out": out_f,
                                "in": in_f,
                                "batch": batch,
                                "path": p,
                                "us": med * 1e6,
                                "us_q1": q1 * 1e6,
                                "us_q3": q3 * 1e6,
                                "gbps": weight_bytes(p, out_f, in_f) / med / 1e9,
                            }
                        )
                    print(
                        f"t={nt} {name:22s} {out_f:6d}x{in_f:<6d} b={batch:<3d} "
                        + " ".join(f"{r['path']}={r['gbps']:.1f}" for r in rows[-len(names) :]),
                        flush=True,
                    )
    return rows


def markdown(rows: list[dict], roof: dict[str, float], load: float) -> str:
    """The GB/s table: one line per (threads, shape, batch), one column per path (median GB/s and
    the time's IQR in µs)."""
    paths = [p for p in PATHS if any(r["path"] == p for r in rows)]
    lines = [
        f"roofline: streaming read {roof['read_gbps']:.1f} GB/s, copy {roof['copy_gbps']:.1f} GB/s; "
        f"1-min load average at start {load:.1f}",
        "",
        "| threads | layer | out x in | batch | " + " | ".join(f"{p} GB/s (µs IQR)" for p in paths) + " |",
        "| ---: | --- | --- | ---: | " + " | ".join("---:" for _ in paths) + " |",
    ]
    keyed: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        keyed.setdefault((r["threads"], r["shape"], r["out"], r["in"], r["batch"]), {})[r["path"]] = r
    for (nt, shape, o, i, b), by_path in keyed.items():
        cells = []
        for p in paths:
            cell = by_path.get(p)
            cells.append(f"{cell['gbps']:.1f} ({cell['us_q1']:.0f}-{cell['us_q3']:.0f})" if cell else "-")
        lines.append(f"| {nt} | {shape} | {o}x{i} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decode_paired(
    model_dir: Path, batches: list[int], output_len: int, rounds: int, input_len: int = 32
) -> list[dict]:
    """Engine generation tok/s of a bf16 checkpoint per batch size, with the linears prepacked and on
    `F.linear` (`set_prepacked`) in alternating rounds on the same loaded model; also whether the two
    gave the same greedy tokens (they must)."""
    from k2serve.engine.sampling_params import SamplingParams
    from k2serve.model.cpu_linear import set_prepacked

    results = []
    g = torch.Generator().manual_seed(0)
    llm = make_llm(model_dir, max(batches), input_len, torch.bfloat16)
    model = llm.engine.model
    vocab = model.config.vocab_size - 256
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for batch in batches:
        prompts = torch.randint(0, vocab, (batch, input_len), generator=g).tolist()
        times: dict[bool, list[float]] = {True: [], False: []}
        tokens: dict[bool, list[list[int]]] = {}
        for r in range(rounds + 1):  # round 0 warms both paths up (and packs the weights)
            for on in (True, False) if r % 2 == 0 else (False, True):
                set_prepacked(model, on)
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params)
                if r > 0:
                    times[on].append(time.perf_counter() - t0)
                tokens[on] = [list(o.token_ids) for o in outs]
        set_prepacked(model, True)
        row: dict[str, Any] = {
            "batch": batch,
            "output_len": output_len,
            "same_tokens": tokens[True] == tokens[False],
        }
        for on, label in ((True, "prepacked"), (False, "f_linear")):
            med, q1, q3 = spread(times[on])
            row |= {
                f"{label}_tok_s": batch * output_len / med,
                f"{label}_tok_s_iqr": (batch * output_len / q3, batch * output_len / q1),
            }
        print(
            f"decode b={batch}: prepacked {row['prepacked_tok_s']:.1f} tok/s, F.linear "
            f"{row['f_linear_tok_s']:.1f} tok/s, same tokens {row['same_tokens']}",
            flush=True,
        )
        results.append(row)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench cpu-gemv", description=__doc__)
    ap.add_argument("--shapes", default="small,k2", help="comma list: preset names and/or k2")
    ap.add_argument("--layers", default="", help="comma list of layer names to keep (default all)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument(
        "--decode-model",
        help="also time engine generation on this bf16 checkpoint (written as `small` if absent), "
        "prepacked linears against F.linear in alternating rounds",
    )
    ap.add_argument("--decode-batches", default="1,8")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--decode-rounds", type=int, default=4)
    ap.add_argument("--skip-gemv", action="store_true", help="only the decode comparison")
    ap.add_argument("--json", help="write the rows and the roofline here")
    args = ap.parse_args(argv)
    shapes = shape_sets(args.shapes.split(","))
    if args.layers:
        keep = set(args.layers.split(","))
        shapes = {k: v for k, v in shapes.items() if k.split(".", 1)[1] in keep}
    paths = tuple(p for p in args.paths.split(",") if p)
    unknown = set(paths) - set(PATHS)
    if unknown:
        ap.error(f"unknown paths {sorted(unknown)}; choose from {', '.join(PATHS)}")
    load = os.getloadavg()[0]
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(max(threads))
    roof = roofline()
    print(f"roofline: read {roof['read_gbps']:.1f} GB/s, copy {roof['copy_gbps']:.1f} GB/s; load {load:.1f}")
    rows = []
    if not args.skip_gemv:
        rows = measure(shapes, [int(b) for b in args.batches.split(",")], threads, args.repeats, paths)
        print(markdown(rows, roof, load))
    decode = []
    if args.decode_model:
        model_dir = Path(args.decode_model)
        if not (model_dir / "config.json").exists():
            write_checkpoint(model_dir, "small", seed=0, dtype=torch.bfloat16)
        torch.set_num_threads(max(threads))
        batches = [int(b) for b in args.decode_batches.split(",")]
        decode = decode_paired(model_dir, batches, args.decode_tokens, args.decode_rounds)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"roofline": roof, "load": load, "rows": rows, "decode": decode}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
