"""`k2serve bench tracing`: what OpenTelemetry tracing costs a request, on against off.

Two local clusters of the same shape run side by side (router + 1 prefill + 1 decode each): one without
tracing, one exporting every span over OTLP/HTTP to a receiver in this process (a real HTTP server that
accepts and counts export requests). Each round sends the same batch of concurrent greedy completions to
one cluster and then the other (the order alternates between rounds, so neither always goes first); the
first round warms both up. Reports each side's median batch time and request latency, and the median of
the per-round on/off ratios, beside the spread of the off side's own rounds (the noise).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import torch


@contextlib.contextmanager
def _sink() -> Iterator[tuple[str, list[int]]]:
    """(base URL, [export requests, bytes]) of an OTLP/HTTP receiver that accepts everything."""
    counts = [0, 0]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            n = int(self.headers["Content-Length"])
            self.rfile.read(n)
            counts[0] += 1
            counts[1] += n
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", counts
    finally:
        server.shutdown()
        server.server_close()


async def _batch(url: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[float]]:
    """Wall seconds of the whole batch and each request's latency."""
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(prompt: list[int]) -> float:
            t = time.perf_counter()
            r = await client.post(
                f"{url}/v1/completions",
                json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
            )
            r.raise_for_status()
            return time.perf_counter() - t

        t0 = time.perf_counter()
        latencies = await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - t0, list(latencies)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench tracing", description=__doc__)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: write the --preset one)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4, help="requests per batch")
    ap.add_argument("--rounds", type=int, default=8, help="measured rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each engine process")
    args = ap.parse_args(argv)
    from k2serve.cluster.local import ClusterSpec, LocalCluster
    from k2serve.config import ModelConfig
    from k2serve.model.checkpoint import preset_checkpoint

    bench_dir = Path(tempfile.gettempdir()) / "k2serve-bench"
    model = Path(args.model) if args.model else preset_checkpoint(bench_dir, args.preset)
    cfg = ModelConfig.from_file(model)
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

    def spec(env: dict[str, str]) -> ClusterSpec:
        return ClusterSpec(
            model_dir=str(model),
            port=0,
            grpc_port=0,
            use_redis=False,
            engine_args=("--kv-cache-mb", "256", "--no-prefix-caching"),
            env=threads | env,
        )

    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"off": [], "on": []}
    latencies: dict[str, list[float]] = {"off": [], "on": []}
    with (
        _sink() as (sink_url, exported),
        LocalCluster(spec({"OTEL_SDK_DISABLED": "true"})) as off,
        LocalCluster(spec({"OTEL_EXPORTER_OTLP_ENDPOINT": sink_url})) as on,
    ):
        urls = {"off": off.http_url, "on": on.http_url}
        for i in range(args.rounds + 1):
            prompts = [
                torch.randint(0, cfg.vocab_size - 256, (args.prompt_len,), generator=g).tolist()
                for _ in range(args.concurrency)
            ]
            order = ("off", "on") if i % 2 else ("on", "off")
            line = []
            for side in order:
                wall, lats = asyncio.run(_batch(urls[side], prompts, args.max_tokens))
                line.append(f"{side} {wall * 1e3:8.1f} ms")
                if i:  # round 0 warms both up
                    times[side].append(wall)
                    latencies[side] += lats
            print(f"  round {i}: " + "   ".join(line) + ("  (warm-up)" if not i else ""), flush=True)
        time.sleep(1.0)  # the last spans' batch (500 ms schedule delay)
    ratios = [a / b for a, b in zip(times["on"], times["off"], strict=True)]
    off_spread = statistics.pstdev(times["off"]) / statistics.mean(times["off"])
    for side in ("off", "on"):
        print(
            f"tracing {side:3s}: batch median {statistics.median(times[side]) * 1e3:.1f} ms, request latency "
            f"median {statistics.median(latencies[side]) * 1e3:.1f} ms over {len(latencies[side])} requests"
        )
    print(
        f"on/off batch time: median of {len(ratios)} paired rounds {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}); off rounds' own spread (CV) {off_spread:.1%}; "
        f"{exported[0]} OTLP export requests, {exported[1] / 1e3:.1f} kB received from the traced cluster"
    )
    print("reproduce: k2serve bench tracing " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
