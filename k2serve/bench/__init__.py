"""Benchmarks run by `k2serve bench ...`: each prints its figures beside a baseline measured in the same run."""

from __future__ import annotations

import tempfile
from pathlib import Path

# Where benches write the preset checkpoints they need (once; reused by later runs).
BENCH_DIR = Path(tempfile.gettempdir()) / "k2serve-bench"


def bench_model(model: str | None, preset: str, dtype: str) -> Path:
    """The checkpoint a cluster bench runs: `--model` when given, else the `--preset` checkpoint in
    `dtype` under BENCH_DIR (written on first use)."""
    if model:
        return Path(model)
    import torch

    from k2serve.model.checkpoint import preset_checkpoint

    return preset_checkpoint(BENCH_DIR, preset, dtype=getattr(torch, dtype))
