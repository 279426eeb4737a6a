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

`--session`: one agent session growing toward 262,144 tokens in one engine (same model, a KV pool of
`--max-context` positions, prefix caching on): each turn appends `--turn-tokens` new (random) user
tokens to the whole history (previous prompt + its reply) and generates `--decode-tokens` greedy tokens.
The prefix cache holds the history, so a turn prefills only its new tokens (in `--chunk` chunks) against
the whole cached context. Per turn: context, tokens served from the prefix cache, prefill seconds and
tokens/s (time to first token), decode ms/token at that context, RSS and peak RSS. Rows are printed as
they finish, so a run stopped early keeps its rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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


def proc_status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes ("VmRSS", "VmHWM": peak RSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


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

from k2serve.bench.long_context import proc_status_bytes as rss

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


def grow_session(
    ckpt: Path, turn_tokens: int, max_context: int, decode_tokens: int, chunk: int
) -> Iterator[dict[str, Any]]:
    """The turns of `--session` (module docstring), one dict per finished turn."""
    from k2serve.engine.config import EngineConfig
    from k2serve.engine.llm import LLM
    from k2serve.engine.sampling_params import SamplingParams

    block_size = 16
    config = EngineConfig(
        block_size=block_size, num_kv_blocks=-(-max_context // block_size) + 1, max_num_batched_tokens=chunk
    )
    llm = LLM(ckpt, "float32", config)
    vocab = llm.engine.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
    history: list[int] = []
    while len(history) + turn_tokens + decode_tokens <= max_context:
        prompt = history + torch.randint(0, vocab, (turn_tokens,), generator=gen).tolist()
        (out,) = llm.generate(prompt, params)
        m = out.metrics
        computed = len(prompt) - out.num_cached_tokens
        yield {
            "context": len(prompt),
            "cached": out.num_cached_tokens,
            "prefill_s": m.ttft,
            "prefill_tok_s": computed / m.ttft,
            "decode_ms": m.tpot * 1e3,
            "rss": proc_status_bytes("VmRSS"),
            "peak_rss": proc_status_bytes("VmHWM"),
            "kv_bytes": llm.engine.pool.kv.numel() * llm.engine.pool.kv.element_size(),
        }
        history = prompt + out.token_ids


def run_session(args: argparse.Namespace) -> None:
    """`--session`: print one markdown row (or JSON object) per turn."""
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_long_bench_checkpoint(Path(tmp) / "ckpt")
        if not args.json:
            print(
                "| turn | context | from prefix cache | prefill s | prefill tok/s | decode ms/token "
                "| RSS MiB | peak RSS MiB | elapsed s |"
            )
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        t0 = time.perf_counter()
        for turn, r in enumerate(
            grow_session(ckpt, args.turn_tokens, args.max_context, args.decode_tokens, args.chunk), 1
        ):
            r["elapsed_s"] = time.perf_counter() - t0
            if args.json:
                print(json.dumps({"turn": turn, **r}), flush=True)
            else:
                print(
                    f"| {turn} | {r['context']:,} | {r['cached']:,} | {r['prefill_s']:.1f} | {r['prefill_tok_s']:,.0f} "
                    f"| {r['decode_ms']:.1f} | {r['rss'] / 2**20:,.0f} | {r['peak_rss'] / 2**20:,.0f} "
                    f"| {r['elapsed_s']:,.0f} |",
                    flush=True,
                )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench long-context", description=__doc__)
    ap.add_argument("--contexts", default="1024,4096,16384,65536", help="comma-separated context lengths")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk (tokens) measured at each context")
    ap.add_argument("--repeats", type=int, default=9, help="decode steps timed per context (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per context (or turn)")
    ap.add_argument("--session", action="store_true", help="grow one agent session turn by turn instead")
    ap.add_argument("--turn-tokens", type=int, default=8192, help="--session: new tokens per turn")
    ap.add_argument("--decode-tokens", type=int, default=8, help="--session: tokens generated per turn")
    ap.add_argument("--max-context", type=int, default=262144, help="--session: the session's last context")
    args = ap.parse_args(argv)
    if args.session:
        for name in ("turn_tokens", "decode_tokens", "chunk"):
            if getattr(args, name) < 1:
                ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if not args.turn_tokens + args.decode_tokens <= args.max_context <= 262144:
            ap.error(
                f"--max-context {args.max_context} must hold one turn (--turn-tokens + --decode-tokens) "
                "and be at most the `long` preset's 262,144 positions"
            )
        run_session(args)
        return 0
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
