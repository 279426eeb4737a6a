"""`k2serve bench interference`: does disaggregation pay off? Decode latency under long prefills.

Workload: `--streams` requests decode continuously (short prompts, long outputs, streamed) while long
prompts (`--long-len` tokens, 1 output token) arrive every `--long-every` seconds. Three runs, each
with the same total CPU budget (`--threads` torch threads in all):
  1. decode-alone: the colocated engine with the decode streams only (the baseline TPOT);
  2. colocated: one engine (`--threads` threads, prefill chunks of `--colocated-chunk` tokens: a
     colocated engine bounds each step's prefill work to keep its decodes flowing) with both kinds;
  3. disaggregated: the local cluster, prefill and decode workers with `--threads // 2` threads each.
Reports p50/p99 TPOT (per stream, mean time per output token after the first) and ITL, and the long
requests' TTFT. Target: disaggregated p99 TPOT within 1.3x of decode-alone, while colocated shows the
interference. Every engine is a process of its own (`k2serve serve`, or the cluster's workers); this
process only generates the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

# The colocated engine's step budget (prefill chunk), chosen by a `--colocated-chunk` sweep (256, 512,
# 1,024, 2,048) on `small` (BENCHMARKS.md, "Disaggregation pays off"): 256 gave both the lowest decode
# p99 TPOT and the lowest long-prompt TTFT of the four.
COLOCATED_CHUNK = 256


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


async def _stream(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> list[float]:
    """Token arrival times (s) of one streamed completion."""
    times: list[float] = []
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    async with client.stream("POST", "/v1/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for ch in chunk.get("choices", []):
                times.extend(
                    [time.perf_counter()] * len(ch.get("token_ids") or ([1] if ch.get("text") else []))
                )
    return times


async def _long(client: httpx.AsyncClient, prompt: list[int]) -> float:
    t = time.perf_counter()
    r = await client.post(
        "/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0}, timeout=900
    )
    r.raise_for_status()
    return time.perf_counter() - t


async def workload(url: str, vocab: int, args: argparse.Namespace, with_long: bool) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    async with httpx.AsyncClient(base_url=url) as client:
        short = [
            torch.randint(0, vocab, (args.short_len,), generator=g).tolist() for _ in range(args.streams)
        ]
        decode = [asyncio.create_task(_stream(client, p, args.output_len)) for p in short]
        longs: list[asyncio.Task[float]] = []
        if with_long:
            await asyncio.sleep(args.long_every / 2)
            while not all(t.done() for t in decode) and len(longs) < args.max_long:
                p = torch.randint(0, vocab, (args.long_len,), generator=g).tolist()
                longs.append(asyncio.create_task(_long(client, p)))
                await asyncio.sleep(args.long_every)
        arrivals = await asyncio.gather(*decode)
        ttfts = await asyncio.gather(*longs)
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in arrivals if len(t) > 1]
    itl = [b - a for t in arrivals for a, b in zip(t, t[1:], strict=False)]
    return {
        "tpot_p50_ms": pct(tpot, 50) * 1e3,
        "tpot_p99_ms": pct(tpot, 99) * 1e3,
        "itl_p99_ms": pct(itl, 99) * 1e3,
        "long_requests": len(ttfts),
        "long_ttft_p50_ms": (statistics.median(ttfts) * 1e3) if ttfts else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench interference", description=__doc__)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the small preset, bf16)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2, help="total torch threads of each setup")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--short-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--long-len", type=int, default=1536)
    ap.add_argument("--long-every", type=float, default=2.0, help="seconds between long prompts")
    ap.add_argument("--max-long", type=int, default=20)
    ap.add_argument(
        "--colocated-chunk",
        type=int,
        default=COLOCATED_CHUNK,
        help="max tokens per step of the colocated engine (its prefill chunk budget)",
    )
    args = ap.parse_args(argv)
    from k2serve.bench.serve_process import serve_process
    from k2serve.cluster.local import ClusterSpec, LocalCluster
    from k2serve.config import ModelConfig
    from k2serve.model.checkpoint import preset_checkpoint

    bench_dir = Path(tempfile.gettempdir()) / "k2serve-bench"
    model = Path(args.model) if args.model else preset_checkpoint(bench_dir, "small")
    vocab = ModelConfig.from_file(model).vocab_size - 256
    results: dict[str, dict[str, float]] = {}
    colocated_args = ["--kv-cache-mb", "1024", "--no-prefix-caching"]
    colocated_args += ["--max-num-batched-tokens", str(args.colocated_chunk)]
    logs = Path(tempfile.mkdtemp(prefix="k2serve-bench-interference-"))
    with serve_process(model, args.dtype, colocated_args, args.threads, logs / "serve.log") as url:
        asyncio.run(workload(url, vocab, args, with_long=False))  # warm-up
        results["decode-alone"] = asyncio.run(workload(url, vocab, args, with_long=False))
        results["colocated"] = asyncio.run(workload(url, vocab, args, with_long=True))
    half = str(max(1, args.threads // 2))
    spec = ClusterSpec(
        model_dir=str(model),
        port=0,
        grpc_port=0,
        use_redis=False,
        dtype=args.dtype,
        engine_args=("--kv-cache-mb", "1024", "--no-prefix-caching"),
        env={"OMP_NUM_THREADS": half, "MKL_NUM_THREADS": half},
    )
    with LocalCluster(spec) as cluster:
        asyncio.run(workload(cluster.http_url, vocab, args, with_long=False))  # warm-up
        results["disaggregated"] = asyncio.run(workload(cluster.http_url, vocab, args, with_long=True))
    base = results["decode-alone"]["tpot_p99_ms"]
    print(
        f"{model.name}: {args.streams} decode streams ({args.short_len} in / {args.output_len} out) + a "
        f"{args.long_len}-token prompt every {args.long_every:g} s; {args.threads} threads per setup; "
        f"colocated chunk {args.colocated_chunk} tokens"
    )
    print(
        f"{'setup':>14}  {'TPOT p50':>9}  {'TPOT p99':>9}  {'ITL p99':>9}  {'p99/alone':>9}  {'long TTFT p50':>13}"
    )
    for name, r in results.items():
        print(
            f"{name:>14}  {r['tpot_p50_ms']:8.1f}ms {r['tpot_p99_ms']:8.1f}ms {r['itl_p99_ms']:8.1f}ms  "
            f"{r['tpot_p99_ms'] / base:8.2f}x  {r['long_ttft_p50_ms']:11.0f}ms ({int(r['long_requests'])} long)"
        )
    print("target: disaggregated p99 TPOT <= 1.3x decode-alone")
    print("reproduce: k2serve bench interference " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
