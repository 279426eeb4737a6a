"""`python -m k2serve.planner.measure_cli (--preset tiny | --model DIR) [--dtype float32] ...`: measure
the dry-run's model parameters on this machine (`k2serve.planner.measure`) and print the
`k2serve planner --dry-run` flags that carry them."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from k2serve.model.checkpoint import write_checkpoint
from k2serve.planner.measure import measure

DESCRIPTION = "Measure the dry-run's model parameters on this machine with the offline engine."


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m k2serve.planner.measure_cli", description=DESCRIPTION)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="write a random-weight checkpoint of this preset (tiny, small)")
    src.add_argument("--model", type=Path, help="a checkpoint directory")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes, comma-separated")
    p.add_argument("--decode-len", type=int, default=32)
    p.add_argument("--kv-cache-mb", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs per figure")
    a = p.parse_args(argv)
    batches = [int(x) for x in a.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model
        if model_dir is None:
            model_dir = write_checkpoint(Path(tmp), a.preset, seed=0, dtype=getattr(torch, a.dtype))
        m = measure(model_dir, a.dtype, a.prompt_len, batches, a.decode_len, a.kv_cache_mb, a.repeats)
    print(
        f"prefill {m.prefill_tokens_per_s:.0f} tokens/s; ITL by batch "
        + ", ".join(f"{b}: {t * 1e3:.1f} ms" for b, t in m.itl_by_batch.items())
    )
    print(m.flags())
    return 0


if __name__ == "__main__":
    sys.exit(main())
