"""`--moe-backend triton`: the routed experts through the Triton grouped GEMM (model/triton_moe.py), on
CPU tensors under TRITON_INTERPRET=1 against the torch path: the dense variant of the kernel, the
engine's greedy tokens on tiny INT4 and fp32 checkpoints, `k2serve generate` end to end with both
Triton backends, and the clear error without CUDA or the interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import greedy_all

from k2serve.engine.config import EngineConfig, EngineConfigError
from k2serve.engine.llm_engine import LLMEngine
from k2serve.model import triton_moe
from k2serve.model.moe import MoE
from k2serve.model.triton_moe import MoEBackendError, grouped_gemm_dense

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46], [7, 1, 8], [2, 71, 82, 81, 8, 28]]


@pytest.fixture(autouse=True)
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_grouped_gemm_matches_torch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    counts = [5, 0, 19, 1]  # an empty expert, one over a 16-row tile, one of a single row
    x = torch.randn(sum(counts), 48, generator=g).to(dtype)
    w = torch.randn(4, 40, 48, generator=g).to(dtype)  # O = 40: a partial column tile; K = 48: partial k
    got = grouped_gemm_dense(x, w, counts)
    want = grouped_gemm_dense(x, w, counts, backend="torch")
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    torch.testing.assert_close(got.float(), want.float(), **tol)
    assert got.dtype == dtype and got.shape == (25, 40)
    assert not torch.equal(got[:5], torch.zeros_like(got[:5]))


def greedy(ckpt: Path, moe_backend: str, attention_backend: str = "torch") -> list[list[int]]:
    cfg = EngineConfig(
        num_kv_blocks=64,
        block_size=8,
        max_num_batched_tokens=32,
        moe_backend=moe_backend,
        attention_backend=attention_backend,
    )
    engine = LLMEngine.from_pretrained(ckpt, torch.float32, cfg)
    moes = [layer.mlp for layer in engine.model.layers if isinstance(layer.mlp, MoE)]
    assert moes and all(m.experts.moe_backend == moe_backend for m in moes)
    return greedy_all(engine, PROMPTS, max_tokens=4)


@pytest.mark.parametrize("ckpt", ["tiny_int4_ckpt", "tiny_ckpt"])
def test_engine_greedy_tokens_equal_torch(
    ckpt: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = request.getfixturevalue(ckpt)
    want = greedy(path, "torch")
    calls: list[int] = []
    real = triton_moe._triton_grouped

    def spy(*a: object) -> torch.Tensor:
        calls.append(1)
        return real(*a)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_moe, "_triton_grouped", spy)
    got = greedy(path, "triton")
    assert calls, "the Triton kernel never ran"
    assert got == want and all(len(t) == 4 for t in want)


@pytest.mark.slow
def test_cli_generate_with_both_triton_backends(tiny_int4_ckpt: Path) -> None:
    """`TRITON_INTERPRET=1 k2serve generate --attention-backend triton --moe-backend triton` on a tiny
    INT4 checkpoint: the torch path's greedy tokens."""
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    ids = ",".join(map(str, PROMPTS[0]))
    cmd = [sys.executable, "-m", "k2serve", "generate", "--model", str(tiny_int4_ckpt), "--prompt-ids", ids]
    cmd += ["--max-tokens", "3", "--json", "--device", "cpu"]
    runs = {}
    for backend in ("torch", "triton"):
        done = subprocess.run(
            [*cmd, "--attention-backend", backend, "--moe-backend", backend],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=True,
        )
        runs[backend] = json.loads(done.stdout.strip().splitlines()[-1])["token_ids"]
    assert runs["triton"] == runs["torch"] and len(runs["torch"]) == 3


def test_triton_without_cuda_or_interpreter_is_refused(
    tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(MoEBackendError, match="moe backend 'triton' needs CUDA or TRITON_INTERPRET=1"):
        LLMEngine.from_pretrained(tiny_ckpt, torch.float32, EngineConfig(moe_backend="triton"))
    with pytest.raises(EngineConfigError, match="moe_backend must be one of torch, triton"):
        EngineConfig(moe_backend="cutlass")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "k2serve", "generate", "--model", str(tiny_ckpt), "--prompt-ids", "1,2"]
        + ["--moe-backend", "triton", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode != 0 and "--moe-backend torch" in done.stderr and "Traceback" not in done.stderr


def test_cli_flag_reaches_the_engine_config() -> None:
    from k2serve.cli.parser import MOE_BACKENDS, build_parser
    from k2serve.cli.settings import engine_args_from_up, engine_config

    assert MOE_BACKENDS == triton_moe.MOE_BACKENDS
    parser = build_parser()
    for command in ("serve", "prefill", "decode"):
        args = parser.parse_args([command, "--preset", "tiny", "--moe-backend", "triton"])
        assert engine_config(args).moe_backend == "triton"
    assert engine_config(parser.parse_args(["serve", "--preset", "tiny"])).moe_backend == "torch"
    passed = engine_args_from_up(parser.parse_args(["up", "--preset", "tiny", "--moe-backend", "triton"]))
    assert passed[passed.index("--moe-backend") + 1] == "triton"
