"""`--moe-backend triton`: the routed experts through the fused Triton kernels (model/triton_moe.py: the
routing's gather and weighted scatter inside the kernels), on CPU tensors under TRITON_INTERPRET=1
against the torch path: the alignment of rows by expert, one MoE layer at K2's hidden size 7168 (INT4
group 32 and dense, fp32 and bf16, T = 1 and 64; moe_intermediate sliced to 128 of K2's 2048 and 4
experts of 384, top-2 of 8: the interpreter takes ~1 ms per op whatever its size), experts not held,
bad shapes, the plain grouped GEMM, the engine's greedy tokens on tiny INT4 and fp32 checkpoints,
`k2serve generate` end to end with both Triton backends, and the clear error without CUDA or the
interpreter."""

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

from k2serve.config import ModelConfig
from k2serve.engine.config import EngineConfig, EngineConfigError
from k2serve.engine.llm_engine import LLMEngine
from k2serve.model import triton_moe
from k2serve.model.moe import MoE, RoutedExperts
from k2serve.model.presets import PRESETS
from k2serve.model.quant import pack_int4, quantize_int4
from k2serve.model.triton_moe import (
    GroupedGemmError,
    MoEBackendError,
    fused_moe,
    grouped_gemm_dense,
    moe_align,
)

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


def test_moe_align_sorts_rows_by_expert_padded_per_block() -> None:
    """Rows (token, slot) = ids 0..6 of experts [2, 0, 2, -1, 1, 2, 0] over 4 experts, blocks of 4:
    each expert's rows in order, padded with the sentinel 7; expert 3 empty; the -1 row left out."""
    align = moe_align(torch.tensor([2, 0, 2, -1, 1, 2, 0]), 4, block_m=4)
    pad = 7
    want = [1, 6, pad, pad, 4, pad, pad, pad, 0, 2, 5, pad]
    assert align.sorted_ids[:12].tolist() == want and align.n_padded.tolist() == [12]
    assert align.sorted_ids.numel() == 20  # the bound: 7 rows + 4 experts x 3 padding, rounded up to 4
    assert set(align.sorted_ids[12:].tolist()) == {pad}
    assert align.block_expert[:3].tolist() == [0, 1, 2] and align.n_rows == 7


def k2_slice_experts(kind: str, dtype: torch.dtype, inter: int = 128) -> RoutedExperts:
    """4 routed experts at K2's hidden size 7168 (moe_intermediate `inter`), random: INT4 group 32 in
    the compressed-tensors layout, or dense in `dtype`."""
    config = ModelConfig.from_dict(
        PRESETS["tiny"]
        | {"hidden_size": 7168, "moe_intermediate_size": inter, "n_routed_experts": 4}
        | {"num_experts_per_tok": 2, "n_group": 1, "topk_group": 1}
    )
    experts = RoutedExperts(config, int4_group_size=32 if kind == "int4" else None, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    d, i = config.hidden_size, inter
    with torch.no_grad():
        for e in range(4):
            w13, w2 = torch.randn(2 * i, d, generator=g) / d**0.5, torch.randn(d, i, generator=g) / i**0.5
            if kind == "dense":
                experts.w13[e], experts.w2[e] = w13, w2
                continue
            (q13, s13), (q2, s2) = quantize_int4(w13, 32), quantize_int4(w2, 32)
            experts.set_int4_expert(e, pack_int4(q13), s13, pack_int4(q2), s2)
    return experts


@pytest.mark.parametrize(
    "tokens", [1, pytest.param(64, marks=pytest.mark.slow)]
)  # 64: ~10-20 s each in the interpreter
@pytest.mark.parametrize("kind", ["int4", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_at_k2_hidden_matches_torch(tokens: int, kind: str, dtype: torch.dtype) -> None:
    """One MoE layer's routed experts (forward: gather, both GEMMs, SwiGLU, weights, sum over top-2)
    through the kernels == the torch path; tokens go to 2 distinct experts of 0, 1 and 3 (expert 2
    empty; at T=64 every used expert has dozens of rows, over several 16-row blocks)."""
    experts = k2_slice_experts(kind, dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, 7168, generator=g).to(dtype)
    ids = torch.tensor([0, 1, 3])[torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(tokens)])]
    weights = torch.rand(tokens, 2, generator=g)
    want = experts(x, weights, ids)
    experts.set_moe_backend("triton")
    got = experts(x, weights, ids)
    assert got.dtype == dtype and got.shape == (tokens, 7168)
    rel = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel
    assert float(want.float().abs().max()) > 0.1  # not a comparison of zeros


def test_fused_moe_skips_experts_not_held() -> None:
    """An expert-parallel rank's RoutedExperts (global experts 1 and 3 of 4): slots routed elsewhere
    add nothing, as in the torch path."""
    config = ModelConfig.from_dict(PRESETS["tiny"] | {"hidden_size": 64, "moe_intermediate_size": 32})
    experts = RoutedExperts(config, expert_ids=[1, 3], dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        experts.w13.normal_(generator=g)
        experts.w2.normal_(generator=g)
    x = torch.randn(5, 64, generator=g)
    ids = torch.tensor([[1, 0], [2, 3], [3, 1], [0, 2], [1, 2]])  # token 3: no expert held
    weights = torch.rand(5, 2, generator=g)
    want = experts(x, weights, ids)
    experts.set_moe_backend("triton")
    got = experts(x, weights, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert torch.equal(got[3], torch.zeros(64)) and bool(got[0].abs().sum() > 0)


def test_fused_moe_refuses_bad_shapes() -> None:
    x = torch.zeros(3, 64)
    w13, w2 = (torch.zeros(2, 64, 64), None), (torch.zeros(2, 64, 32), None)
    ids = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(GroupedGemmError, match=r"ids must be \[3, top_k\]"):
        fused_moe(x, None, ids[:2], w13, w2, 32)
    with pytest.raises(GroupedGemmError, match="weights must be"):
        fused_moe(x, torch.zeros(3, 1), ids, w13, w2, 32)
    with pytest.raises(GroupedGemmError, match=r"w13 must be a float \[E, 64, 64\]"):
        fused_moe(x, None, ids, (torch.zeros(2, 60, 64), None), w2, 32)
    with pytest.raises(GroupedGemmError, match=r"w2 packed must be int32 \[E, 64, 4\]"):
        fused_moe(x, None, ids, w13, (torch.zeros(2, 64, 4), torch.zeros(2, 64, 1)), 32)
    with pytest.raises(GroupedGemmError, match="w2 must hold the 2 experts"):
        fused_moe(x, None, ids, w13, (torch.zeros(3, 64, 32), None), 32)
    assert fused_moe(torch.zeros(0, 64), None, ids[:0], w13, w2, 32).shape == (0, 64)


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
    """The engine's MoE layers run the fused path: the gate_up pass (SwiGLU in the kernel, A rows
    read by sorted_id // top_k) and the weighted down pass, each step."""
    path = request.getfixturevalue(ckpt)
    want = greedy(path, "torch")
    passes: list[tuple[bool, bool]] = []
    real = triton_moe._launch

    def spy(*a: object, **kw: object) -> None:
        passes.append((bool(kw.get("swiglu")), kw.get("route") is not None))
        real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_moe, "_launch", spy)
    got = greedy(path, "triton")
    assert {(True, False), (False, True)} <= set(passes), "the fused kernels never ran"
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
