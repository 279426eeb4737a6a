"""The Triton absorbed paged-attention kernel against the torch path, on CPU tensors under TRITON_INTERPRET=1.

The kernel's Partials against `attend_absorbed` over `paged_tiles` of the same blocks (K2's 512 + 64
latent, heads per rank, ragged items, padding, several scattered blocks, absorbed prefill rows), the
engine's greedy tokens and a step's logits with attention_backend="triton" against "torch", the CLI
end to end, and the clear error without CUDA or the interpreter. The interpreter runs the kernel in
numpy, slowly: contexts stay short.
"""

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

from k2serve.engine import model_runner
from k2serve.engine.config import EngineConfig, EngineConfigError
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.model_runner import ModelRunner, RowSpec, build_step_inputs
from k2serve.kvcache.fp8 import Fp8Layout
from k2serve.kvcache.pool import KVCachePool
from k2serve.model.attention import (
    PAD_KEY_POS,
    Partial,
    attend_absorbed,
    attend_expanded,
    merge_partials,
    paged_tiles,
)
from k2serve.model.loader import load_model
from k2serve.model.triton_attention import (
    ATTENTION_BACKENDS,
    AttentionBackendError,
    paged_absorbed,
    paged_expanded,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton==3.9.0)"
)


@pytest.fixture(autouse=True)
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernel is first built, in the test


def ragged_items(
    c: int, dr: int, heads: int, queries: int, block_size: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, ...]:
    """A pool of 12 blocks and 4 items of 3 blocks each (scattered, repeated block ids): full; ragged
    (ends mid-block, PAD_KEY_POS after); a query before some of its keys (causal mask); all padding
    (sees nothing). Returns q_lat, q_pe, q_pos, pages, key_blocks, key_pos."""
    g = torch.Generator().manual_seed(seed)
    pages = torch.randn(12, block_size, c + dr, generator=g).to(dtype)
    key_blocks = torch.tensor([[7, 2, 9], [4, 11, 0], [3, 3, 5], [0, 0, 0]])
    keys = 3 * block_size
    key_pos = torch.arange(keys).repeat(4, 1)
    key_pos[1, keys - block_size // 2 - 1 :] = PAD_KEY_POS  # ragged: ends inside the last block
    key_pos[3] = PAD_KEY_POS
    last = torch.tensor([keys - 1, keys - block_size // 2 - 2, block_size + 1, 10])[:, None]
    q_pos = last - torch.arange(queries).flip(0)[None, :]  # [N, Q]: consecutive queries ending at `last`
    if queries > 1:
        q_pos[0, 0] = -1  # a padding query
    q_lat = (torch.randn(4, queries, heads, c, generator=g) * c**-0.5).to(dtype)
    q_pe = (torch.randn(4, queries, heads, dr, generator=g) * dr**-0.5).to(dtype)
    return q_lat, q_pe, q_pos, pages, key_blocks, key_pos


def reference(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    q_pos: torch.Tensor,
    pages: torch.Tensor,
    key_blocks: torch.Tensor,
    key_pos: torch.Tensor,
    scale: float,
) -> Partial:
    return attend_absorbed(
        q_lat, q_pe, q_pos, paged_tiles(pages, key_blocks, key_pos, 2 * pages.shape[1]), scale
    )


def assert_partials_close(got: Partial, want: Partial, tol: float) -> None:
    assert got.out.dtype == torch.float32 and got.out.shape == want.out.shape
    assert torch.equal(torch.isinf(got.lse), torch.isinf(want.lse))  # the same rows saw no key
    seen = ~torch.isinf(want.lse)
    assert (got.lse[seen] - want.lse[seen]).abs().max() <= tol * 10
    assert (got.out - want.out).abs().max() <= tol * want.out.abs().max()
    assert torch.equal(got.out[~seen], torch.zeros_like(got.out[~seen]))


@pytest.mark.parametrize(
    ("dtype", "heads", "tol"),
    [(torch.float32, 16, 1e-5), (torch.bfloat16, 4, 2e-2)],  # bf16: the torch path rounds its scores
)
def test_decode_partials_equal_attend_absorbed_at_k2_dims(dtype: torch.dtype, heads: int, tol: float) -> None:
    """K2's latent (C = 512, dr = 64), heads per rank, one decode query per item. bf16: the torch
    path's bmm rounds the scores to bf16 before the softmax, the kernel keeps them in fp32, so out
    agrees to 2e-2 of its largest value (observed ~6e-3) and lse to 0.2."""
    q_lat, q_pe, q_pos, pages, key_blocks, key_pos = ragged_items(512, 64, heads, 1, 16, dtype, seed=0)
    scale = 0.07
    got = paged_absorbed(q_lat, q_pe, q_pos, pages, key_blocks, key_pos, scale)
    want = reference(q_lat, q_pe, q_pos, pages, key_blocks, key_pos, scale)
    assert torch.isinf(want.lse[3]).all() and not torch.isinf(want.lse[:3]).any()
    assert_partials_close(got, want, tol)
    # split-K: the four items as splits of two queries merge to the same rows as the torch path's
    token = torch.tensor([[0], [1], [0], [1]])
    merged = merge_partials(got, token, 2)
    torch.testing.assert_close(
        merged, merge_partials(want, token, 2), rtol=0, atol=tol * want.out.abs().max()
    )


@pytest.mark.parametrize(("c", "dr", "block_size"), [(64, 16, 8), (40, 8, 6)])
def test_prefill_rows_and_small_dims(c: int, dr: int, block_size: int) -> None:
    """Several queries per item (an absorbed prefill chunk: rows = queries x heads, more than one
    program's 16), a padding query, the tiny preset's latent and odd dims (C = 40, dr = 8 padded to
    powers of two, 6-slot blocks straddling the kernel's 16-key steps)."""
    q_lat, q_pe, q_pos, pages, key_blocks, key_pos = ragged_items(
        c, dr, 4, 5, block_size, torch.float32, seed=1
    )
    got = paged_absorbed(q_lat, q_pe, q_pos, pages, key_blocks, key_pos, 0.2)
    want = reference(q_lat, q_pe, q_pos, pages, key_blocks, key_pos, 0.2)
    assert torch.isinf(want.lse[0, 0]).all()  # the padding query
    assert_partials_close(got, want, 1e-5)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_expanded_prefill_partials_equal_attend_expanded_at_k2_dims(dtype: torch.dtype, tol: float) -> None:
    """The expanded kernel at K2's heads (C = 512, dn = 128, dv = 128, dr = 64; two heads), five
    queries per item (a prefill chunk, one padding query): the Partials of `attend_expanded`. bf16:
    k_nope, v and the scores rounded to bf16 by the torch path, kept in fp32 in the kernel where the
    torch path keeps them in fp32 (observed ~8e-3 of the largest out)."""
    q_lat, q_pe, q_pos, pages, key_blocks, key_pos = ragged_items(512, 64, 2, 5, 16, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    q_nope = (torch.randn(4, 5, 2, 128, generator=g) * 128**-0.5).to(dtype)
    weight = (torch.randn(2 * 256, 512, generator=g) * 512**-0.5).to(dtype)
    got = paged_expanded(q_nope, q_pe, q_pos, pages, key_blocks, key_pos, weight, 128, 0.07)
    tiles = paged_tiles(pages, key_blocks, key_pos, 32)
    want = attend_expanded(q_nope, q_pe, q_pos, tiles, weight, 128, 0.07)
    assert got.out.shape == (4, 5, 2, 128)
    assert_partials_close(got, want, tol)


def test_bad_inputs_are_named() -> None:
    q_lat, q_pe, q_pos, pages, key_blocks, key_pos = ragged_items(64, 16, 4, 1, 8, torch.float32, seed=2)
    with pytest.raises(AttentionBackendError, match="pages must be"):
        paged_absorbed(q_lat, q_pe, q_pos, pages[..., :-1], key_blocks, key_pos, 0.1)
    with pytest.raises(AttentionBackendError, match="key_pos"):
        paged_absorbed(q_lat, q_pe, q_pos, pages, key_blocks, key_pos[:, :-1], 0.1)


def step_logits(ckpt: Path, backend: str, fp8: bool = False) -> torch.Tensor:
    """One runner step over a prefilled pool: an absorbed prefill chunk (4 queries over 44 keys), an
    expanded one (a fresh 8-token prompt), a decode row over 70 consecutive blocks' keys (KeyRuns:
    8-key splits), a short decode row in scattered blocks. Returns the sampling rows' logits."""
    model = load_model(ckpt, torch.float32)
    c = model.config
    layout = Fp8Layout(c.kv_lora_rank, c.qk_rope_head_dim) if fp8 else None
    pool = KVCachePool(c.num_hidden_layers, 24, 8, c.kv_cache_dim, torch.float32, fp8=layout)
    g = torch.Generator().manual_seed(4)
    for layer in range(c.num_hidden_layers):
        pool.write(
            layer, torch.arange(pool.num_slots), torch.randn(pool.num_slots, c.kv_cache_dim, generator=g)
        )
    rows = [
        RowSpec([1, 2, 3, 4], 40, [20, 3, 17, 5, 9, 1], True),
        RowSpec([5], 69, list(range(9)), True),
        RowSpec([6], 12, [22, 11], True),
        RowSpec([7, 8, 9, 10, 11, 12, 13, 14], 0, [14], True),
    ]
    tiles = model_runner.TileConfig(tile_tokens=16, split_tokens=8)
    work = build_step_inputs(rows, pool, c, tiles).work
    # the paths this step must cover: absorbed and expanded chunks, decode splits, in-place runs
    assert [w.absorbed for w in work] == [True, False, True] and work[2].runs
    return ModelRunner(model, pool, tiles=tiles, attention_backend=backend).run(rows)


def test_runner_step_logits_equal_torch(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every work item of the step goes through the kernels (counted), and the logits equal the
    torch path's up to fp32 summation order."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    for name in ("paged_absorbed", "paged_expanded"):
        kernel = getattr(model_runner, name)

        def counted(q: torch.Tensor, *args: object, kernel: object = kernel, name: str = name) -> Partial:
            calls.append((name, tuple(q.shape)))
            return kernel(q, *args)  # type: ignore[operator, no-any-return]

        monkeypatch.setattr(model_runner, name, counted)
    want = step_logits(tiny_ckpt, "torch")
    assert calls == []
    got = step_logits(tiny_ckpt, "triton")
    # per layer (3): the absorbed chunk [1, 4, H, C], the expanded one [1, 8, H, dn], the gathered
    # decode splits, the run's splits [8, 1, H, C]
    assert len(calls) == 4 * 3
    assert {("paged_absorbed", (1, 4, 4, 64)), ("paged_expanded", (1, 8, 4, 32))} <= set(calls)
    assert ("paged_absorbed", (8, 1, 4, 64)) in calls
    calls.clear()
    fp8 = step_logits(tiny_ckpt, "triton", fp8=True)  # an fp8 cache stays on the torch path
    assert calls == []
    assert torch.equal(fp8, step_logits(tiny_ckpt, "torch", fp8=True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)  # logits of order 1..10: fp32 sum order
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def greedy(ckpt: Path, backend: str, prompts: list[list[int]]) -> list[list[int]]:
    engine = LLMEngine.from_pretrained(
        ckpt,
        torch.float32,
        EngineConfig(num_kv_blocks=64, block_size=8, max_num_batched_tokens=32, attention_backend=backend),
    )
    engine.runner.tiles = model_runner.TileConfig(tile_tokens=16, split_tokens=16)
    return greedy_all(engine, prompts, max_tokens=4)


def test_engine_greedy_tokens_equal_torch(tiny_ckpt: Path) -> None:
    """Three prompts, one spanning several blocks and prefilled in chunks (absorbed chunks over a
    long context), decode rows cut in 16-key splits: the same greedy tokens as the torch path."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 1024, (n,), generator=g).tolist() for n in (45, 3, 11)]
    want = greedy(tiny_ckpt, "torch", prompts)
    assert greedy(tiny_ckpt, "triton", prompts) == want
    assert all(len(t) == 4 for t in want)


def test_cli_generate_with_the_triton_backend(tiny_ckpt: Path) -> None:
    """`TRITON_INTERPRET=1 k2serve generate --attention-backend triton` end to end: the torch path's tokens."""
    ids = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [
        "generate",
        "--model",
        str(tiny_ckpt),
        "--prompt-ids",
        ",".join(map(str, ids)),
        "--max-tokens",
        "3",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "k2serve", *args, "--json", "--attention-backend", "triton"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    got = json.loads(done.stdout.strip().splitlines()[-1])["token_ids"]
    want = greedy(tiny_ckpt, "torch", [ids])[0][:3]
    assert got == want and len(got) == 3


def test_triton_without_cuda_or_interpreter_is_refused(
    tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(AttentionBackendError, match="needs CUDA or TRITON_INTERPRET=1"):
        LLMEngine.from_pretrained(tiny_ckpt, torch.float32, EngineConfig(attention_backend="triton"))
    with pytest.raises(EngineConfigError, match="attention_backend must be one of torch, triton"):
        EngineConfig(attention_backend="cuda")


def test_cli_flag_reaches_the_engine_config() -> None:
    from k2serve.cli.parser import ATTENTION_BACKENDS as CLI_BACKENDS
    from k2serve.cli.parser import build_parser
    from k2serve.cli.settings import engine_args_from_up, engine_config

    assert CLI_BACKENDS == ATTENTION_BACKENDS
    parser = build_parser()
    for command in ("serve", "prefill", "decode"):
        args = parser.parse_args([command, "--preset", "tiny", "--attention-backend", "triton"])
        assert engine_config(args).attention_backend == "triton"
    assert engine_config(parser.parse_args(["serve", "--preset", "tiny"])).attention_backend == "torch"
    passed = engine_args_from_up(
        parser.parse_args(["up", "--preset", "tiny", "--attention-backend", "triton"])
    )
    assert passed[passed.index("--attention-backend") + 1] == "triton"
    args = parser.parse_args(["generate", "--model", "m", "--prompt", "x", "--attention-backend", "triton"])
    assert args.attention_backend == "triton"
