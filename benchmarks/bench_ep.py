"""One expert-parallel MoE layer vs the single-process layer, with the time spent in all_to_all.

    python benchmarks/bench_ep.py                             # `small` preset MoE layer, bf16, R = 2
    python benchmarks/bench_ep.py --world 4 --tokens 1 16 256 --dtype float32

Each of R ranks (processes, gloo over localhost, --threads intra-op threads each) runs the layer on
T tokens of its own; the baseline runs the same layer with all experts on R * T tokens in one process
with R * --threads threads. Reported per T: median layer time of the EP ranks (the slowest rank per
repeat), the share of it spent inside the three all_to_alls, and the baseline's median. Weights are
random (the router is seeded identically on every rank, so routing is realistic); only time is measured.
On the 2-core test machine R ranks share two cores: read the all_to_all share, not the speedup.

Skewed routing with and without EPLB (--skew-bias B):

    python benchmarks/bench_ep.py --skew-bias 0.3 --hot 8 --tokens 64 512 --rounds 20

K2's router bias (e_score_correction_bias) is raised by B on experts 0..--hot-1, which the contiguous
placement puts all on rank 0. Each rank then holds the layer twice: with the contiguous placement,
and with the EPLB placement planned from the group's measured load (`ExpertLoad` over warm-up
forwards, `plan_placement`) and moved there by `reshard_layer`, as a serving group does. Paired
rounds alternate the two (ABBA) on the same inputs; reported per T: the group's load imbalance
(max / mean expert load per rank) under each, the median (and min-max) of the slowest rank's layer
time, and the group's routed-token throughput ratio; and the slowest rank's CPU time (thread time,
--threads 1) in the grouped expert compute alone: the critical path EPLB shortens when every rank
has a device of its own. Wall times on a machine whose ranks share cores (and with other load) do
not show that: the group's total work is the same, only its split between ranks changes. --redundant gives both placements that many
replica slots per rank.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch

from k2serve.config import ModelConfig
from k2serve.experts import EPComm, EPDispatcher, EPState, ExpertPlacement, dispatch, plan_placement
from k2serve.experts.eplb import ExpertLoad, imbalance
from k2serve.experts.reshard import reshard_layer
from k2serve.model.moe import MoE
from k2serve.model.presets import PRESETS


def _moe(
    config: ModelConfig, expert_ids: Sequence[int] | None, dtype: torch.dtype, hot: int = 0, bias: float = 0.0
) -> MoE:
    """The layer with random weights (seeded: the same router and shared expert on every rank); the
    router bias of experts 0..hot-1 raised by `bias` (skewed routing)."""
    torch.manual_seed(0)  # same router and shared expert on every rank
    moe = MoE(config, expert_ids, None, dtype).to(dtype)
    with torch.no_grad():
        moe.gate.weight.normal_(0, config.hidden_size**-0.5)
        moe.gate.float()
        moe.gate.e_score_correction_bias[:hot] += bias
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


def _skew_rank(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    """Contiguous vs EPLB placement of one skewed layer on this rank, in paired alternating rounds."""
    torch.set_num_threads(args.threads)
    config = ModelConfig.from_dict(PRESETS[args.preset])
    dtype = getattr(torch, args.dtype)
    comm = EPComm.connect(f"tcp://127.0.0.1:{port}", rank, world, timedelta(seconds=300))
    start = ExpertPlacement.contiguous(config.n_routed_experts, world, args.redundant)
    load = ExpertLoad(1, config.n_routed_experts)
    layers = {}
    for name in ("contiguous", "eplb"):
        moe = _moe(config, start.owned(rank), dtype, args.hot, args.skew_bias)
        state = EPState(comm, (start,), load if name == "contiguous" else None)
        moe.dispatch = EPDispatcher(state, 1, 0)
        layers[name] = (moe, state)
    # this rank's CPU seconds in the grouped expert compute (its share of the routed work): thread
    # time, not wall time, so the other rank and other processes on the same cores do not count
    computing = [0.0]
    inner = dispatch.run_sorted

    def timed(*a: Any) -> torch.Tensor:
        t0 = time.thread_time()
        y = inner(*a)
        computing[0] += time.thread_time() - t0
        return y

    dispatch.run_sorted = timed  # type: ignore[assignment]  # the dispatcher looks it up per call
    g = torch.Generator().manual_seed(rank)
    inputs = {t: torch.randn(t, config.hidden_size, generator=g).to(dtype) for t in args.tokens}
    with torch.inference_mode():
        for x in inputs.values():  # the load EPLB plans from: warm-up forwards of every size
            layers["contiguous"][0](x)
        counts = load.global_counts(comm)[0]
        planned = plan_placement(counts, [len(s) for s in start.slots])
        moe, state = layers["eplb"]
        t0 = time.perf_counter()
        reshard_layer(comm, moe.experts, start, planned, 1)
        reshard_s = time.perf_counter() - t0
        state.set_placement((planned,))
        results: dict[int, dict[str, list[float]]] = {}
        for t, x in inputs.items():
            names = ("contiguous", "eplb")
            times: dict[str, list[float]] = {n: [] for n in (*names, *(f"{n} compute" for n in names))}
            for name in names:
                layers[name][0](x)  # warm-up of this size
            for i in range(args.rounds):
                for name in names if i % 2 == 0 else names[::-1]:
                    computing[0] = 0.0
                    times[name] += _time(functools.partial(layers[name][0], x), 1)
                    times[f"{name} compute"].append(computing[0])
            results[t] = times
    out.put((rank, results, (imbalance(start, counts), imbalance(planned, counts), reshard_s)))
    comm.close()


def _spawn(target: Callable[..., None], args: argparse.Namespace) -> dict[int, Any]:
    """Run `target(rank, world, port, args, queue)` in --world spawned processes; rank -> what it put."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=target, args=(r, args.world, port, args, q), daemon=True)
        for r in range(args.world)
    ]
    for p in procs:
        p.start()
    try:
        got = [q.get(timeout=1800) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return {item[0]: item[1:] for item in got}


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.2f} ({min(values) * 1e3:.2f}-{max(values) * 1e3:.2f})"


def skew_main(args: argparse.Namespace) -> None:
    per_rank = _spawn(_skew_rank, args)
    before, after, reshard_s = per_rank[0][1]
    print(
        f"# {args.preset} MoE layer, {args.dtype}, R={args.world} x {args.threads} thread(s), router bias "
        f"+{args.skew_bias} on experts 0-{args.hot - 1}, {args.redundant} redundant slot(s)/rank, "
        f"{args.rounds} paired rounds"
    )
    print(
        f"# load imbalance (max/mean per rank): contiguous {before:.3f}, EPLB {after:.3f}; "
        f"reshard {reshard_s * 1e3:.0f} ms"
    )
    print(
        "| tokens/rank T | layer, contiguous: median (min-max) ms | layer, EPLB | throughput EPLB / contiguous "
        "| slowest rank's expert compute CPU, contiguous ms | same, EPLB | ratio |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in args.tokens:
        slowest = {  # per round, the slowest rank's figure
            name: [max(per_rank[r][0][t][name][i] for r in per_rank) for i in range(args.rounds)]
            for name in per_rank[0][0][t]
        }
        ratio = statistics.median(slowest["contiguous"]) / statistics.median(slowest["eplb"])
        compute = statistics.median(slowest["contiguous compute"]) / statistics.median(
            slowest["eplb compute"]
        )
        print(
            f"| {t} | {_spread(slowest['contiguous'])} | {_spread(slowest['eplb'])} | {ratio:.2f}x "
            f"| {_spread(slowest['contiguous compute'])} | {_spread(slowest['eplb compute'])} | {compute:.2f}x |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512], help="tokens per rank")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--skew-bias", type=float, default=None, help="skewed routing, contiguous vs EPLB")
    ap.add_argument("--hot", type=int, default=8, help="--skew-bias: experts 0..hot-1 get the bias")
    ap.add_argument("--redundant", type=int, default=0, help="--skew-bias: replica slots per rank")
    ap.add_argument("--rounds", type=int, default=20, help="--skew-bias: paired rounds per T")
    args = ap.parse_args()
    if args.skew_bias is not None:
        skew_main(args)
        return

    per_rank = {r: got[0] for r, got in _spawn(_rank, args).items()}

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
