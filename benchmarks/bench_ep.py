"""One expert-parallel MoE layer vs the single-process layer, with the time spent in all_to_all.

    python benchmarks/bench_ep.py                             # `small` preset MoE layer, bf16, R = 2
    python benchmarks/bench_ep.py --world 4 --tokens 1 16 256 --dtype float32

Each of R ranks (processes, gloo over localhost, --threads intra-op threads each) runs the layer on
T tokens of its own; the baseline runs the same layer with all experts on R * T tokens in one process
with R * --threads threads. Reported per T: median layer time of the EP ranks (the slowest rank per
repeat), the share of it spent inside the three all_to_alls, and the baseline's median. Weights are
random (the router is seeded identically on every rank, so routing is realistic); only time is measured.
On the 2-core test machine R ranks share two cores: read the all_to_all share, not the speedup.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch

from k2serve.config import ModelConfig
from k2serve.experts import EPComm, EPDispatcher, EPState, ExpertPlacement
from k2serve.model.moe import MoE
from k2serve.model.presets import PRESETS


def _moe(config: ModelConfig, expert_ids: Sequence[int] | None, dtype: torch.dtype) -> MoE:
    torch.manual_seed(0)  # same router and shared expert on every rank
    moe = MoE(config, expert_ids, None, dtype).to(dtype)
    with torch.no_grad():
        moe.gate.weight.normal_(0, config.hidden_size**-0.5)
        moe.gate.float()
        for p in [
            moe.experts.w13,
            moe.experts.w2,
            *(moe.shared_experts.parameters() if moe.shared_experts else []),
        ]:
            p.normal_(0, p.shape[-1] ** -0.5)
    return moe.eval()


def _time(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds per call, after one untimed warm-up call (first-shape kernel selection)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    torch.set_num_threads(args.threads)
    config = ModelConfig.from_dict(PRESETS[args.preset])
    comm = EPComm.connect(f"tcp://127.0.0.1:{port}", rank, world, timedelta(seconds=120))
    placement = ExpertPlacement.contiguous(config.n_routed_experts, world)
    moe = _moe(config, placement.owned(rank), getattr(torch, args.dtype))
    moe.dispatch = EPDispatcher(EPState(comm, (placement,)), 1, 0)
    spent = [0.0]
    inner = comm.all_to_all

    def timed(*a: Any, **k: Any) -> None:
        t0 = time.perf_counter()
        inner(*a, **k)
        spent[0] += time.perf_counter() - t0

    comm.all_to_all = timed  # type: ignore[method-assign]
    results = {}
    g = torch.Generator().manual_seed(rank)
    for t in args.tokens:
        x = torch.randn(t, config.hidden_size, generator=g).to(getattr(torch, args.dtype))
        with torch.inference_mode():
            moe(x)  # warm-up
            spent[0] = 0.0
            times = _time(lambda x=x: moe(x), args.repeats)
        results[t] = (times, spent[0] / sum(times))
    out.put((rank, results))
    comm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512], help="tokens per rank")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=_rank, args=(r, args.world, port, args, q), daemon=True) for r in range(args.world)
    ]
    for p in procs:
        p.start()
    try:
        per_rank = dict(q.get(timeout=600) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()

    config = ModelConfig.from_dict(PRESETS[args.preset])
    full = _moe(config, None, getattr(torch, args.dtype))
    print(f"# {args.preset} MoE layer, {args.dtype}, R={args.world} x {args.threads} thread(s)")
    print(
        "| tokens/rank T | EP median (ms) | all_to_all share | 1 process, R*T tokens (ms) | same, R x threads |"
    )
    print("| ---: | ---: | ---: | ---: | ---: |")
    for t in args.tokens:
        slowest = [max(per_rank[r][t][0][i] for r in per_rank) for i in range(args.repeats)]
        share = max(per_rank[r][t][1] for r in per_rank)
        x = torch.randn(t * args.world, config.hidden_size).to(getattr(torch, args.dtype))
        base = []
        for threads in (args.threads, args.threads * args.world):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                full(x)  # warm-up
                base.append(statistics.median(_time(lambda x=x: full(x), args.repeats)) * 1e3)
        ep = statistics.median(slowest) * 1e3
        print(f"| {t} | {ep:.2f} | {share:.0%} | {base[0]:.2f} | {base[1]:.2f} |")


if __name__ == "__main__":
    main()
