"""`k2serve bench long-neighbour`: short decodes beside one very long sequence, against alone.

One step of the engine's `ModelRunner` decodes `--shorts` sequences of `--short-len` context each
("alone"), or the same rows plus one sequence of context L in the same step ("beside"); the short rows'
speed beside / alone is alone_time / beside_time (issue 15's acceptance asks >= 0.5). The long row is
read two ways, both in every round: "in place" (its splits in the leading run of consecutive pool
blocks attended through views of the pool: what the engine does) and "gathered" (every split gathered
block by block into the shared batch: what it does when the blocks are scattered). Rounds alternate
alone / in place / gathered in a rotating order; the figures are medians over rounds of each round's
median step time, with min-max of the per-round ratios.

Bytes the long row adds per layer (fp32 latent of C + dr values a key): the scores read L x (C + dr) x 4,
P.V reads L x C x 4; gathering first copies L x (C + dr) x 4 (read + write) more. For the `long` bench
dims (16 + 8) at L = 65,536: 6.3 + 4.2 MB in place, + 12.6 MB gathered, per layer.

Model: `write_long_bench_checkpoint`'s, the `long` preset cut to `LONG_BENCH_DIMS` (2 layers, hidden 64, a 16+8 latent), fp32, pool filled
with random latent (every context already cached).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from k2serve.bench.long_context import write_long_bench_checkpoint
from k2serve.engine import model_runner
from k2serve.engine.model_runner import ModelRunner, RowSpec
from k2serve.kvcache.pool import KVCachePool
from k2serve.model.model import K2Model

BLOCK = 16


@dataclass(frozen=True)
class NeighbourBatches:
    runner: ModelRunner
    shorts: list[RowSpec]
    long: RowSpec


def neighbour_batches(model: K2Model, long_len: int, short_len: int, shorts: int) -> NeighbourBatches:
    """A pool holding `shorts` contexts of `short_len` and one of `long_len` (each in consecutive
    blocks), filled with random latent; the decode rows of each."""
    c = model.config
    per_short = -(-short_len // BLOCK)
    num_blocks = shorts * per_short + -(-long_len // BLOCK)
    pool = KVCachePool(c.num_hidden_layers, num_blocks, BLOCK, c.kv_cache_dim, torch.float32)
    pool.kv.normal_(generator=torch.Generator().manual_seed(0))
    rows = [
        RowSpec([7 + i], short_len - 1, list(range(i * per_short, (i + 1) * per_short)), True)
        for i in range(shorts)
    ]
    long_row = RowSpec([5], long_len - 1, list(range(shorts * per_short, num_blocks)), True)
    return NeighbourBatches(ModelRunner(model, pool), rows, long_row)


@contextmanager
def gathered() -> Iterator[None]:
    """Every decode split gathered block by block (no in-place runs) while inside."""
    saved = model_runner.RUN_MIN_SPLITS
    model_runner.RUN_MIN_SPLITS = sys.maxsize
    try:
        yield
    finally:
        model_runner.RUN_MIN_SPLITS = saved


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def step_seconds(
    b: NeighbourBatches, rows: list[RowSpec], steps: int, gather: bool = False, clock: str = "wall"
) -> float:
    """Median time of `steps` runs of one step over `rows`, by `clock`: "wall", or "cpu" (this
    process's CPU time: with one torch thread, robust to other processes taking the cores)."""
    now = CLOCKS[clock]
    times = []
    with gathered() if gather else nullcontext():
        for _ in range(steps):
            t0 = now()
            b.runner.run(rows)
            times.append(now() - t0)
    return statistics.median(times)


def paired_rounds(
    b: NeighbourBatches, rounds: int, steps: int, clock: str = "wall"
) -> dict[str, list[float]]:
    """Per round: median step seconds of alone, beside (in place), beside (gathered), order rotating."""
    beside = [*b.shorts, b.long]
    cases = {
        "alone": lambda: step_seconds(b, b.shorts, steps, clock=clock),
        "in_place": lambda: step_seconds(b, beside, steps, clock=clock),
        "gathered": lambda: step_seconds(b, beside, steps, gather=True, clock=clock),
    }
    for run in cases.values():
        run()  # warm-up
    out: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for i in range(rounds):
        for name in names[i % 3 :] + names[: i % 3]:
            out[name].append(cases[name]())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench long-neighbour", description=__doc__)
    ap.add_argument("--contexts", default="16384,65536", help="long row's context lengths, comma-separated")
    ap.add_argument("--shorts", type=int, default=16, help="short rows in the step")
    ap.add_argument("--short-len", type=int, default=256, help="context of each short row")
    ap.add_argument("--rounds", type=int, default=15, help="paired rounds")
    ap.add_argument("--steps", type=int, default=5, help="steps timed per case and round (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (use with --threads 1)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from k2serve.model.loader import load_model

    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(write_long_bench_checkpoint(Path(tmp) / "ckpt"), torch.float32)
    print(
        f"threads {torch.get_num_threads()}, {args.clock} clock, {args.shorts} short rows of {args.short_len} tokens"
    )
    print(
        "| long context | alone ms | beside, in place ms | beside, gathered ms | ratio in place (min-max) "
        "| ratio gathered (min-max) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for n in (int(x) for x in args.contexts.split(",")):
        b = neighbour_batches(model, n, args.short_len, args.shorts)
        r = paired_rounds(b, args.rounds, args.steps, args.clock)
        med = {k: statistics.median(v) * 1e3 for k, v in r.items()}
        cells = []
        for name in ("in_place", "gathered"):
            ratios = [a / x for a, x in zip(r["alone"], r[name], strict=True)]
            cells.append(f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        print(
            f"| {n:,} | {med['alone']:.2f} | {med['in_place']:.2f} | {med['gathered']:.2f} | {cells[0]} | {cells[1]} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
