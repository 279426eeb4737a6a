"""`k2serve bench ttft`: time to first token of a disaggregated request against one colocated engine.

The same prompt (random token ids) goes, alternately and one at a time, to (a) a local cluster (router +
1 prefill + 1 decode process, the latent KV moving over the chosen transfer backend) and (b) one engine
behind the same HTTP API (`k2serve serve`, a process of its own; this process only sends requests), each
engine process with the same number of torch threads. Both answer `max_tokens=1` completions, so the latency is the
TTFT as a client sees it. Reports medians and the ratio (target: disaggregated <= 1.15x colocated).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch


def _ttft(url: str, prompt: list[int]) -> float:
    t = time.perf_counter()
    r = httpx.post(
        f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0}, timeout=600
    )
    r.raise_for_status()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench ttft", description=__doc__)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: write the small preset)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--transfer-backend", default="torch", choices=("grpc", "torch"))
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each engine process")
    args = ap.parse_args(argv)
    from k2serve.bench.serve_process import serve_process
    from k2serve.cluster.local import ClusterSpec, LocalCluster
    from k2serve.config import ModelConfig
    from k2serve.model.checkpoint import preset_checkpoint

    bench_dir = Path(tempfile.gettempdir()) / "k2serve-bench"
    model = Path(args.model) if args.model else preset_checkpoint(bench_dir, args.preset)
    cfg = ModelConfig.from_file(model)
    nbytes = (
        args.prompt_len
        * cfg.num_hidden_layers
        * cfg.kv_cache_dim
        * torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    )
    print(
        f"{model.name}: prompt {args.prompt_len} tokens -> {nbytes / 1e6:.1f} MB of latent KV to move "
        f"({cfg.num_hidden_layers} layers x {cfg.kv_cache_dim} values x {args.dtype})"
    )
    engine_args = (
        "--kv-cache-mb",
        "512",
        "--no-prefix-caching",
        "--max-num-batched-tokens",
        str(max(2048, args.prompt_len)),
    )
    spec = ClusterSpec(
        model_dir=str(model),
        port=0,
        grpc_port=0,
        use_redis=False,
        dtype=args.dtype,
        engine_args=engine_args,
        transfer_backend=args.transfer_backend,
        env={"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)},
    )
    disagg: list[float] = []
    coloc: list[float] = []
    g = torch.Generator().manual_seed(0)
    logs = Path(tempfile.mkdtemp(prefix="k2serve-bench-ttft-"))
    with (
        LocalCluster(spec) as cluster,
        serve_process(model, args.dtype, engine_args, args.threads, logs / "serve.log") as url,
    ):
        for i in range(args.repeats + 1):
            prompt = torch.randint(0, cfg.vocab_size - 256, (args.prompt_len,), generator=g).tolist()
            a, b = _ttft(cluster.http_url, prompt), _ttft(url, prompt)
            if i:  # the first round warms both up
                disagg.append(a)
                coloc.append(b)
            print(
                f"  round {i}: disaggregated {a * 1e3:8.1f} ms   colocated {b * 1e3:8.1f} ms"
                + ("  (warm-up)" if not i else ""),
                flush=True,
            )
        w = httpx.get(f"{cluster.http_url}/cluster/workers").json()
    d, c = statistics.median(disagg), statistics.median(coloc)
    print(
        f"KV sending overlapped with compute: {w['exposed_transfer_ms']:.1f} ms of transfer still on the wire "
        f"after {w['prefill_compute_ms']:.1f} ms of prefill compute, over {args.repeats + 1} requests "
        f"({nbytes / 1e6:.1f} MB each)"
    )
    print(
        f"TTFT median: disaggregated {d * 1e3:.1f} ms, colocated {c * 1e3:.1f} ms -> ratio {d / c:.3f} "
        f"(target <= 1.15)"
    )
    print("reproduce: k2serve bench ttft " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
