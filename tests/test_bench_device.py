"""`k2serve bench device` in its CPU mode (what CI runs; the same script checks a GPU): every check
runs and passes, the kernels under TRITON_INTERPRET=1, the decode figures against a measured CPU
bandwidth, and the roofline arithmetic itself."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from k2serve.bench.device import GPU_PEAK_BANDWIDTH, slice_bytes_per_step

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_cpu_mode_runs_every_check() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "k2serve", "bench", "device", "--device", "cpu", "--json"]
        + ["--batch-sizes", "1,8", "--steps", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    checks = {c["check"]: c for c in map(json.loads, done.stdout.strip().splitlines())}
    assert set(checks) == {
        "logits",
        "fused-moe-int4-float32",
        "fused-moe-dense-float32",
        "fused-moe-int4-bfloat16",
        "fused-moe-dense-bfloat16",
        "paged-attention",
        "cuda-graph",
        "decode-b1",
        "decode-b8",
    }
    assert all(c["ok"] for c in checks.values())
    assert checks["logits"]["max_rel_err"] == 0.0  # CPU against CPU: the same computation
    assert checks["fused-moe-int4-float32"]["max_rel_err"] < 1e-4
    assert "compiled (Inductor)" in checks["cuda-graph"]["detail"]  # CPU mode: compiled == eager
    assert checks["cuda-graph"]["captured_steps"] > 0 and checks["cuda-graph"]["max_rel_err"] < 1e-4
    for b in (1, 8):
        d = checks[f"decode-b{b}"]
        assert d["batch"] == b and d["tok_s"] > 0 and d["roofline_tok_s"] > 0 and d["bandwidth_gbs"] > 0.1


def test_roofline_bytes() -> None:
    """Bytes per step: non-expert weights + the expected distinct routed experts + the batch's KV."""
    from k2serve.bench.device import random_slice, slice_config
    from k2serve.config import ModelConfig

    model = random_slice(ModelConfig.from_dict(slice_config(False)), torch.device("cpu"), torch.float32)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    routed = sum(t.numel() * t.element_size() for n, t in tensors if ".experts." in n)
    rest = sum(t.numel() * t.element_size() for n, t in tensors) - routed
    e, k = model.config.n_routed_experts, model.config.num_experts_per_tok
    assert slice_bytes_per_step(model, 1, 0, 0) == int(rest + routed * k / e)  # one token: top-k experts
    big = slice_bytes_per_step(model, 10_000, 0, 0)
    assert abs(big - (rest + routed)) <= 1  # many tokens: every expert
    kv = slice_bytes_per_step(model, 4, 100, 1152) - slice_bytes_per_step(model, 4, 0, 0)
    assert kv == 4 * 100 * 1152 * model.config.num_hidden_layers
    assert dict(GPU_PEAK_BANDWIDTH)["H100"] == 3.35e12 and dict(GPU_PEAK_BANDWIDTH)["H200"] == 4.8e12
