"""`k2serve planner` arguments -> PlannerConfig (+ SimParams) -> the dry-run or the live loop.
Parsing stops here.

  k2serve planner --dry-run --trace FILE [--time-scale X] [--limit N] [model flags] [planner flags]
  k2serve planner --router URL --connector virtual|kubernetes [--namespace NS --release NAME] [planner flags]
  k2serve planner --connector local --model DIR [planner flags]   (starts its own LocalCluster)
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import sys
import threading
from collections.abc import Sequence

import httpx

from k2serve.planner.config import PlannerConfig, PlannerConfigError, RoleLimits, SimParams

PROG = "k2serve planner"


DESCRIPTION = (
    "Scale prefill and decode replicas from the router's metrics against SLO targets, or replay a trace "
    "offline through a queueing model (--dry-run) and print the replica timeline."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The planner's flags, on `p` (the `k2serve planner` subparser, or a parser of its own)."""
    d, s = PlannerConfig(), SimParams()
    mode = p.add_argument_group("what to run")
    mode.add_argument("--dry-run", action="store_true", help="simulate --trace offline; touches nothing")
    mode.add_argument("--trace", default=None, help="Mooncake JSONL trace (dry-run)")
    mode.add_argument(
        "--time-scale", type=float, default=1.0, help="arrival = timestamp x this (0.1: 10x faster)"
    )
    mode.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    mode.add_argument("--router", default="http://127.0.0.1:8000", help="the router's HTTP address (live)")
    mode.add_argument(
        "--connector",
        choices=("virtual", "kubernetes", "local"),
        default="virtual",
        help="virtual: decide and print only; kubernetes: scale the chart's StatefulSets (in whole "
        "expert-parallel groups); local: start a LocalCluster (--model) and scale its processes",
    )
    mode.add_argument(
        "--router-ca", default=None, help="CA bundle the router's HTTPS certificate is verified against"
    )
    mode.add_argument(
        "--api-key",
        default=os.environ.get("K2SERVE_API_KEY"),
        help="the router's API key, sent as a bearer token (default: $K2SERVE_API_KEY)",
    )
    mode.add_argument("--interval", type=float, default=s.interval_s, help="seconds between decisions")
    mode.add_argument("--verbose", action="store_true", help="print holds too, not only changes")
    k8s = p.add_argument_group("kubernetes connector")
    k8s.add_argument("--namespace", default="default")
    k8s.add_argument(
        "--release", default="k2serve", help="Helm release: StatefulSets <fullname>-prefill/-decode"
    )
    k8s.add_argument("--fullname-override", default=None, help="the chart's fullnameOverride, if set")
    k8s.add_argument("--statefulset-prefill", default=None, help="explicit name (overrides --release)")
    k8s.add_argument("--statefulset-decode", default=None, help="explicit name (overrides --release)")
    k8s.add_argument(
        "--kubeconfig", default=None, help="default: in-cluster service account, else ~/.kube/config"
    )
    loc = p.add_argument_group("local connector")
    loc.add_argument("--model", default=None, help="checkpoint directory the local cluster serves")
    loc.add_argument("--port", type=int, default=8000, help="the local router's HTTP port")
    loc.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds before a draining worker is killed"
    )
    pol = p.add_argument_group("planner (targets, hysteresis, bounds)")
    pol.add_argument("--ttft-slo", type=float, default=d.ttft_slo_s, help="TTFT target, s")
    pol.add_argument("--itl-slo", type=float, default=d.itl_slo_s, help="inter-token latency target, s")
    pol.add_argument("--quantile", type=float, default=d.quantile, help="latency quantile held to the SLOs")
    pol.add_argument("--prefill-queue-per-replica", type=float, default=d.prefill_queue_per_replica)
    pol.add_argument("--decode-queue-per-replica", type=float, default=d.decode_queue_per_replica)
    pol.add_argument("--kv-high", type=float, default=d.kv_high, help="decode KV fraction that scales up")
    pol.add_argument("--kv-low", type=float, default=d.kv_low, help="decode KV fraction allowing scale-down")
    pol.add_argument("--down-fraction", type=float, default=d.down_fraction, help="low band, x target")
    pol.add_argument("--up-after", type=int, default=d.up_after, help="observations over target to scale up")
    pol.add_argument("--down-after", type=int, default=d.down_after, help="idle observations to scale down")
    pol.add_argument("--up-cooldown", type=float, default=d.up_cooldown_s, help="s after a change")
    pol.add_argument("--down-cooldown", type=float, default=d.down_cooldown_s, help="s after a change")
    pol.add_argument("--min-prefill", type=int, default=d.prefill.min_replicas)
    pol.add_argument("--max-prefill", type=int, default=d.prefill.max_replicas)
    pol.add_argument("--min-decode", type=int, default=d.decode.min_replicas)
    pol.add_argument("--max-decode", type=int, default=d.decode.max_replicas)
    pol.add_argument("--max-step-up", type=int, default=d.prefill.max_step_up, help="replicas added at once")
    sim = p.add_argument_group("dry-run model (defaults: the tiny preset on a CPU; see SimParams)")
    sim.add_argument("--prefill-tokens-per-s", type=float, default=s.prefill_tokens_per_s)
    sim.add_argument("--decode-itl-base", type=float, default=s.decode_itl_base_s, help="s, batch of 1")
    sim.add_argument(
        "--decode-itl-per-seq", type=float, default=s.decode_itl_per_seq_s, help="s per sequence"
    )
    sim.add_argument("--decode-max-batch", type=int, default=s.decode_max_batch)
    sim.add_argument("--decode-kv-tokens", type=int, default=s.decode_kv_tokens, help="per decode replica")
    sim.add_argument("--startup", type=float, default=s.startup_s, help="s from scale-up to serving")
    sim.add_argument("--step", type=float, default=s.step_s, help="simulation step, s")
    sim.add_argument(
        "--max-tail", type=float, default=3600.0, help="simulate at most this long after the last arrival, s"
    )
    sim.add_argument("--initial-prefill", type=int, default=1)
    sim.add_argument("--initial-decode", type=int, default=1)


def config_from_args(args: argparse.Namespace) -> PlannerConfig:
    return PlannerConfig(
        ttft_slo_s=args.ttft_slo,
        itl_slo_s=args.itl_slo,
        quantile=args.quantile,
        prefill_queue_per_replica=args.prefill_queue_per_replica,
        decode_queue_per_replica=args.decode_queue_per_replica,
        kv_high=args.kv_high,
        kv_low=args.kv_low,
        down_fraction=args.down_fraction,
        up_after=args.up_after,
        down_after=args.down_after,
        up_cooldown_s=args.up_cooldown,
        down_cooldown_s=args.down_cooldown,
        prefill=RoleLimits(args.min_prefill, args.max_prefill, args.max_step_up),
        decode=RoleLimits(args.min_decode, args.max_decode, args.max_step_up),
    )


def sim_params_from_args(args: argparse.Namespace) -> SimParams:
    return SimParams(
        prefill_tokens_per_s=args.prefill_tokens_per_s,
        decode_itl_base_s=args.decode_itl_base,
        decode_itl_per_seq_s=args.decode_itl_per_seq,
        decode_max_batch=args.decode_max_batch,
        decode_kv_tokens=args.decode_kv_tokens,
        startup_s=args.startup,
        step_s=args.step,
        interval_s=args.interval,
    )


def dry_run(args: argparse.Namespace, config: PlannerConfig) -> int:
    from k2serve.loadgen.trace import read_trace
    from k2serve.planner.policy import Planner
    from k2serve.planner.simulate import Simulation

    params = sim_params_from_args(args)
    entries = read_trace(args.trace, limit=args.limit)
    if not entries:
        raise ValueError(f"{args.trace}: no requests")
    print(
        f"# dry-run of {args.trace}: {len(entries)} requests, time scale {args.time_scale:g}; "
        f"prefill {params.prefill_tokens_per_s:g} tokens/s per replica, decode ITL "
        f"{params.decode_itl_base_s * 1e3:g} ms + {params.decode_itl_per_seq_s * 1e3:g} ms x batch",
        flush=True,
    )
    longest = sorted(e.input_length for e in entries)[int(config.quantile * (len(entries) - 1))]
    if longest / params.prefill_tokens_per_s > config.ttft_slo_s:
        print(
            f"# note: computing the p{round(config.quantile * 100)} prompt ({longest} tokens) alone takes "
            f"{longest / params.prefill_tokens_per_s:.1f} s > the TTFT SLO {config.ttft_slo_s:g} s: no "
            "replica count meets it",
            flush=True,
        )
    print("# time (simulated s since the trace start), replica targets from then on, reason", flush=True)
    sim = Simulation(
        entries,
        Planner(config),
        params,
        initial=(args.initial_prefill, args.initial_decode),
        time_scale=args.time_scale,
        max_tail_s=args.max_tail,
    )
    result = sim.run(lambda row: print(row.format(), flush=True))
    print(f"# {result.summary(config.ttft_slo_s, config.quantile)}")
    return 0


def router_client(ca_file: str | None, api_key: str | None, timeout_s: float = 5.0) -> httpx.Client:
    """The planner's HTTP client for the router: verifies HTTPS against `ca_file` (default: the system
    CAs) and sends `api_key` as a bearer token when given."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
    return httpx.Client(timeout=timeout_s, headers=headers, verify=verify)


def live(args: argparse.Namespace, config: PlannerConfig) -> int:
    from k2serve.planner.connector import Connector, VirtualConnector
    from k2serve.planner.loop import run_planner
    from k2serve.planner.policy import Planner
    from k2serve.planner.scrape import RouterScraper

    cluster = None
    connector: Connector
    url = args.router
    client = router_client(args.router_ca, args.api_key)
    if args.connector == "kubernetes":
        from k2serve.planner.kube import KubernetesConnector, statefulset_names

        names = statefulset_names(args.release, fullname_override=args.fullname_override)
        names["prefill"] = args.statefulset_prefill or names["prefill"]
        names["decode"] = args.statefulset_decode or names["decode"]
        connector = KubernetesConnector.from_environment(args.namespace, names, args.kubeconfig)
    elif args.connector == "local":
        from k2serve.cluster.local import ClusterSpec, LocalCluster
        from k2serve.planner.local import LocalConnector

        if not args.model:
            raise ValueError("--connector local needs --model DIR")
        spec = ClusterSpec(
            model_dir=args.model,
            port=args.port,
            grpc_port=0,
            num_prefill=max(1, args.initial_prefill),
            num_decode=max(1, args.initial_decode),
        )
        cluster = LocalCluster(spec).start()
        url = cluster.http_url
        connector = LocalConnector(cluster, args.drain_timeout)
        print(cluster.status_table(), flush=True)
    else:
        workers = client.get(f"{url.rstrip('/')}/cluster/workers").raise_for_status().json()["workers"]
        counts = {r: sum(1 for w in workers if w["role"] == r) for r in ("prefill", "decode")}
        connector = VirtualConnector(counts)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    scraper = RouterScraper(url, connector.replicas, config.quantile, client=client)
    print(f"# planner on {url} through the {args.connector} connector; Ctrl-C stops", flush=True)
    try:
        run_planner(Planner(config), scraper.observe, connector, args.interval, stop, verbose=args.verbose)
    finally:
        scraper.close()
        connector.close()
        if cluster is not None:
            cluster.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    """Run what the parsed flags ask for. Exit status 0, or 2 (with the reason on stderr) for bad or
    inconsistent flags, an unreadable or invalid trace, or a router / API server unreachable at start."""
    from k2serve.loadgen.trace import TraceFormatError

    try:
        config = config_from_args(args)
        if args.dry_run != bool(args.trace):
            raise ValueError("--dry-run and --trace FILE go together")
        return dry_run(args, config) if args.dry_run else live(args, config)
    except (PlannerConfigError, TraceFormatError, ValueError, OSError, httpx.HTTPError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(list(argv) if argv is not None else None))


if __name__ == "__main__":
    sys.exit(main())
