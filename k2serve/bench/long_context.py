"""`k2serve bench long-context`: memory, decode time per token and prefill speed against context length.

For each context length L (default 1K, 4K, 16K, 64K; add 262144 for K2's full length) a fresh process
loads a tiny-dims `long` model (K2's 262,144 YaRN positions; 2 layers, dense + MoE, hidden 64: the dims
of tests/test_long_context.py, so a CPU runs 64K in seconds) with a KV pool of exactly L positions,
filled with random latent (positions [0, L) cached, as after a prefill), and measures through the
engine's ModelRunner (tiled attention, paged latent):
  - prefill: the last `--chunk` tokens of an L-token prompt (the chunk with the largest context), once
    after a warm-up chunk at a short context: tokens/s;
  - decode: one token at context L, `--repeats` times: median ms per token;
  - memory: peak RSS of the process (weights + KV pool + transient), the KV pool's bytes, and the
    transient (peak RSS during the prefill chunk and the decodes - RSS before them).
Work per prefill chunk and per decode token is O(L) (one pass over the context), so both times grow
linearly in L; memory is the O(L) pool plus a bounded transient.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

# The `long` preset cut to 2 layers (one dense, one MoE), 2 heads: this bench's model and the long-context tests'.
LONG_BENCH_DIMS: dict[str, Any] = {
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "hidden_size": 64,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
}


def write_long_bench_checkpoint(path: Path, **overrides: Any) -> Path:
    """Write this bench's model (the `long` preset with LONG_BENCH_DIMS, `overrides` on top; random fp32
    weights, seed 0) to `path`; returns the checkpoint directory."""
    from k2serve.model.checkpoint import write_checkpoint
    from k2serve.model.presets import PRESETS

    return Path(
        write_checkpoint(path, PRESETS["long"] | LONG_BENCH_DIMS | overrides, seed=0, dtype=torch.float32)
    )


_CHILD = r"""
import json, statistics, sys, time
from pathlib import Path
import torch
from k2serve.engine.model_runner import ModelRunner, RowSpec
from k2serve.kvcache.pool import KVCachePool
from k2serve.model.loader import load_model

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)

ckpt, n, chunk, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = load_model(ckpt, torch.float32)
c = model.config
bs = 16
pool = KVCachePool(c.num_hidden_layers, n // bs, bs, c.kv_cache_dim, torch.float32)
pool.kv.normal_(generator=torch.Generator().manual_seed(0))
table = list(range(n // bs))
prompt = torch.randint(0, c.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
runner = ModelRunner(model, pool)
runner.run([RowSpec(prompt[:chunk], 0, table, True)])  # warm-up at a short context
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
base = rss("VmRSS")
t0 = time.perf_counter()
runner.run([RowSpec(prompt[n - chunk :], n - chunk, table, True)])
prefill_s = time.perf_counter() - t0
times = []
for i in range(repeats + 1):
    t0 = time.perf_counter()
    runner.run([RowSpec([prompt[-1]], n - 1, table, True)])
    times.append(time.perf_counter() - t0)
print(json.dumps({"context": n, "prefill_s": prefill_s, "prefill_tok_s": chunk / prefill_s,
                  "decode_ms": statistics.median(times[1:]) * 1e3, "peak_rss": rss("VmHWM"),
                  "transient": rss("VmHWM") - base, "kv_bytes": pool.kv.numel() * pool.kv.element_size()}))
"""


def measure(ckpt: Path, context: int, chunk: int, repeats: int, threads: int) -> dict[str, Any]:
    code = f"import torch; torch.set_num_threads({threads})\n" + _CHILD if threads else _CHILD
    proc = subprocess.run(  # noqa: S603 - this interpreter running our own child script
        [sys.executable, "-c", code, str(ckpt), str(context), str(chunk), str(repeats)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"context {context}: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench long-context", description=__doc__)
    ap.add_argument("--contexts", default="1024,4096,16384,65536", help="comma-separated context lengths")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk (tokens) measured at each context")
    ap.add_argument("--repeats", type=int, default=9, help="decode steps timed per context (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per context")
    args = ap.parse_args(argv)
    contexts = [int(x) for x in args.contexts.split(",")]
    for n in contexts:
        if n % 16 or n < args.chunk:
            ap.error(f"--contexts: {n} must be a multiple of 16 and >= --chunk ({args.chunk})")
        if n > 262144:
            ap.error(f"--contexts: {n} is past the `long` preset's 262,144 positions")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_long_bench_checkpoint(Path(tmp) / "ckpt")
        if not args.json:
            print(
                "| context | prefill tok/s (last chunk) | prefill chunk s | decode ms/token "
                "| peak RSS MiB | KV pool MiB | transient MiB |"
            )
            print("|---:|---:|---:|---:|---:|---:|---:|")
        for n in contexts:
            r = measure(ckpt, n, args.chunk, args.repeats, args.threads)
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                print(
                    f"| {n:,} | {r['prefill_tok_s']:,.0f} | {r['prefill_s']:.2f} | {r['decode_ms']:.2f} "
                    f"| {r['peak_rss'] / 2**20:,.0f} | {r['kv_bytes'] / 2**20:,.1f} | {r['transient'] / 2**20:,.0f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
