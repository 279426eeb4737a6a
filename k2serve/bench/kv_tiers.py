"""`k2serve bench kv-tiers`: time to first token of a long-context turn whose KV blocks were evicted from
the device pool: reloaded from the host tier, the disk tier or the shared store, or recomputed (no tier).

One process, seven engines of the same model (the `long` preset with LONG_BENCH_DIMS, 2 layers; with
`--k2-latent` its latent is K2's 512 + 64 values per token and layer, so a block's bytes per layer are
K2's): `none` (prefix caching, no tiers), `host` (--kv-offload-host-mb), `disk` (host tier off, a disk
tier in a temporary directory), `mooncake` (no local tier, the shared Mooncake Store tier on a local
mooncake_master this command starts, blocks put on compute, a segment that holds every context of the
run: the reload is a get over TCP from this process's own segment through the master; needs the
`mooncake` extra; `--modes` leaves it out), each tier mode asynchronous (the default: disk writes and
reloads, store gets included, on background threads) and `-sync` (--no-kv-offload-async: inside the
step). Each engine's pool holds one context and a bit. Per round and engine, in
alternating order (paired rounds): prefill context A (one token), prefill a different context B of the
same length (evicts A's blocks: into the tier where there is one), then time context A + one new
block of tokens to its first token: the reload (or the recompute) of A's blocks plus that block's prefill.
A warm-up round is not recorded; queued disk writes are finished before each timed turn (the turn's own
offloads are not). Reported: median and min-max of the TTFT per mode, the tier hit tokens of the last
round, and the reload bytes per second.

`--reuse-context` (for long contexts, where every prefill is expensive): context A is prefilled once per
engine, and each round evicts it by reserving every block of the pool (`reserve_kv`, then `free_kv`:
A's blocks go to the tier as B's prefill would send them, without computing B), then times A + 16 new
tokens; the tier modes reload the same blocks each round (the tiers are inclusive), the `none` mode
recomputes them. `--reload-timeout-s`: the engines' kv_reload_timeout_s (a reload not done by then is
given up and recomputed; `reload_timeouts` counts them per mode).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from k2serve.bench.long_context import write_long_bench_checkpoint
from k2serve.cluster.mooncake_master import MooncakeMaster

MODES = ("none", "host-sync", "host", "disk-sync", "disk", "mooncake-sync", "mooncake")


def _store_segment_bytes(ckpt: Path, context: int, rounds: int) -> int:
    """A store segment that holds every context a run puts (3 per round, warm-up included) half again
    over: Mooncake evicts at 90% full, not in LRU order, and an evicted block of A ends its reload."""
    c = json.loads((ckpt / "config.json").read_text())
    token_bytes = c["num_hidden_layers"] * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * 4  # fp32 rows
    return max(64 << 20, 3 * (rounds + 1) * context * token_bytes * 3 // 2)


def _engine(
    ckpt: Path,
    mode: str,
    context: int,
    tmp: Path,
    master: Any = None,
    rounds: int = 0,
    reload_timeout_s: float = 10.0,
) -> Any:
    from k2serve.engine.config import EngineConfig
    from k2serve.engine.llm_engine import LLMEngine

    bs = 16
    tier_mb = max(1, 4 * context * 2**10 // 2**20)  # generous: a tier never drops A here
    kw: dict[str, Any] = {
        "kv_offload_async": not mode.endswith("-sync"),
        "kv_reload_timeout_s": reload_timeout_s,
    }
    tier = mode.removesuffix("-sync")
    if tier == "host":
        kw["kv_offload_host_bytes"] = tier_mb << 20 << 4
    elif tier == "disk":
        kw |= {"kv_offload_dir": str(tmp / "disk"), "kv_offload_disk_bytes": tier_mb << 20 << 4}
    elif tier == "mooncake":
        kw |= {
            "kv_store": "mooncake",
            "kv_store_master": master.address,
            "kv_store_metadata": master.metadata_url,
            "kv_store_segment_bytes": _store_segment_bytes(ckpt, context, rounds),
            "kv_store_local_hostname": "127.0.0.1",
        }
    cfg = EngineConfig(
        block_size=bs,
        num_kv_blocks=context // bs,  # one context: B evicts all of A's blocks but the last two
        max_num_batched_tokens=4096,
        max_model_len=context,
        **kw,
    )
    return LLMEngine.from_pretrained(ckpt, torch.float32, cfg)


def _ttft(engine: Any, rid: str, tokens: list[int]) -> float:
    from k2serve.engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    engine.add_request(rid, tokens, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t0


def _evict_all(engine: Any) -> None:
    """Push every cached block out of `engine`'s pool (into its tiers, if any): reserve the whole pool,
    then give it back (the `--reuse-context` way of evicting A without prefilling B)."""
    reservation = engine.reserve_kv(engine.blocks.num_free_blocks * engine.blocks.block_size)
    engine.free_kv(reservation.block_table)


def run(
    context: int,
    rounds: int,
    k2_latent: bool,
    modes: tuple[str, ...] = MODES,
    reuse_context: bool = False,
    reload_timeout_s: float = 10.0,
) -> dict[str, Any]:
    """The figures of `rounds` paired rounds at `context` tokens (see the module docstring)."""
    over = {"kv_lora_rank": 512, "qk_rope_head_dim": 64} if k2_latent else {}
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        ckpt = write_long_bench_checkpoint(Path(tmp) / "ckpt", **over)
        master = (
            stack.enter_context(MooncakeMaster()) if any(m.startswith("mooncake") for m in modes) else None
        )
        engines = {
            m: _engine(
                ckpt, m, context, Path(tmp) / m, master, 1 if reuse_context else rounds, reload_timeout_s
            )
            for m in modes
        }
        for e in engines.values():
            if e.tiers is not None:
                stack.callback(e.tiers.close)
        times: dict[str, list[float]] = {m: [] for m in modes}
        hits: dict[str, dict[str, int]] = {}
        a = torch.randint(0, 1000, (context - 32,), generator=g).tolist()
        for r in range(-1, rounds):  # round -1: a warm-up, not recorded
            if not reuse_context:
                a = torch.randint(0, 1000, (context - 32,), generator=g).tolist()
            b = torch.randint(0, 1000, (context - 16,), generator=g).tolist()
            turn = a + torch.randint(0, 1000, (16,), generator=g).tolist()
            order = modes if r % 2 == 0 else modes[::-1]  # alternate who goes first
            for m in order:
                e = engines[m]
                if reuse_context:
                    if r == -1:
                        _ttft(e, "a", a)
                    _evict_all(e)
                else:
                    _ttft(e, f"a{r}", a)
                    _ttft(e, f"b{r}", b)
                if e.tiers is not None:  # queued disk writes and store puts of A's and B's blocks are done
                    e.tiers.flush()
                before = dict(e.tiers.stats.hit_tokens) if e.tiers is not None else {}
                hit0 = e.blocks.prefix_hit_tokens
                t = _ttft(e, f"t{r}", turn)
                print(f"kv-tiers {context}: round {r} {m} {t:.3f} s", file=sys.stderr, flush=True)
                if r >= 0:
                    times[m].append(t)
                hits[m] = {"all": e.blocks.prefix_hit_tokens - hit0}
                if e.tiers is not None:
                    hits[m] |= {t: e.tiers.stats.hit_tokens[t] - before[t] for t in before}
        out: dict[str, Any] = {
            "context": context,
            "rounds": rounds,
            "k2_latent": k2_latent,
            "reuse_context": reuse_context,
            "reload_timeout_s": reload_timeout_s,
        }
        for m in modes:
            ts = times[m]
            out[m] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts)}
            e = engines[m]
            out[m]["hit_tokens_last_round"] = hits[m]
            if e.tiers is not None:
                st = e.tiers.stats
                tier = m.removesuffix("-sync")
                secs = st.reload_seconds[tier]
                out[m]["reload_GBps"] = st.reload_bytes[tier] / secs / 1e9 if secs else 0.0
                out[m]["block_bytes"] = e.pool.bytes_per_block
                out[m]["reload_timeouts"] = e.reloads.timeouts_total if e.reloads is not None else 0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench kv-tiers", description=__doc__)
    ap.add_argument("--contexts", default="8192", help="comma-separated context lengths (multiples of 16)")
    ap.add_argument("--rounds", type=int, default=5, help="paired rounds per context")
    ap.add_argument("--k2-latent", action="store_true", help="K2's 512 + 64 latent per token and layer")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument(
        "--reuse-context",
        action="store_true",
        help="prefill A once per engine, evict it by reserving the pool each round (no B prefill)",
    )
    ap.add_argument("--reload-timeout-s", type=float, default=10.0, help="the engines' kv_reload_timeout_s")
    args = ap.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or not set(modes) <= set(MODES):
        ap.error(f"--modes must name some of {', '.join(MODES)}, got {args.modes!r}")
    if args.reload_timeout_s <= 0:
        ap.error(f"--reload-timeout-s must be > 0, got {args.reload_timeout_s}")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    contexts = [int(x) for x in args.contexts.split(",")]
    for n in contexts:
        if n % 16 or not 256 <= n <= 262144:
            ap.error(f"--contexts: {n} must be a multiple of 16 in [256, 262144]")
    if args.threads:
        torch.set_num_threads(args.threads)
    for n in contexts:
        print(
            json.dumps(run(n, args.rounds, args.k2_latent, modes, args.reuse_context, args.reload_timeout_s)),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
