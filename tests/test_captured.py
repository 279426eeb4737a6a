"""The captured decode step (engine/captured.py): static-shape forward per batch bucket, padding rows,
the static MoE paths, and the engine's tokens and logits against eager (fp32)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch._inductor.utils import fresh_cache, run_and_get_code

from k2serve.config import ModelConfig
from k2serve.engine.captured import (
    CapturedDecode,
    DecodeRow,
    blocks_bucket,
    capture_sizes,
    unsupported_reason,
)
from k2serve.engine.config import EngineConfig, EngineConfigError
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.model_runner import RowSpec, captured_rows
from k2serve.engine.sampling_params import SamplingParams
from k2serve.model.moe import HAS_GROUPED_MM, MoE
from k2serve.model.presets import PRESETS

GREEDY = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One torch thread: these tiny steps are dispatch-bound, and on a loaded 2-core host two
    spinning OpenMP threads make them ~40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_engine(ckpt: Path, compile: str = "none", **kw: Any) -> LLMEngine:
    cfg = EngineConfig(
        **({"num_kv_blocks": 96, "block_size": 8, "max_num_batched_tokens": 96, "max_num_seqs": 4} | kw),
        compile=compile,
    )
    return LLMEngine.from_pretrained(ckpt, torch.float32, cfg)


def static_eager(engine: LLMEngine) -> CapturedDecode:
    """The engine's captured step with its static forward run eagerly (no Inductor: fast)."""
    old = engine.runner.captured
    assert old is not None
    new = CapturedDecode(
        engine.model, engine.pool, old.pad_slot, engine.config.max_num_seqs, old.max_blocks, compile=False
    )
    engine.runner.captured = new
    return new


def record_logits(engine: LLMEngine) -> list[torch.Tensor]:
    """Every step's logits, in order (the runner's output is wrapped, not changed)."""
    seen: list[torch.Tensor] = []
    run = engine.runner.run

    def wrapped(rows: Any, on_layer: Any = None) -> torch.Tensor:
        out = run(rows, on_layer)
        seen.append(out.clone())
        return out

    engine.runner.run = wrapped  # type: ignore[method-assign]
    return seen


def workload(engine: LLMEngine) -> dict[str, tuple[list[int], int]]:
    """Mixed context lengths (3 .. 37 tokens, so 1 .. 8 blocks of 8), two prompts sharing a 24-token
    prefix (a prefix hit for the later one), arrivals over time so batches of 1 .. 4 rows occur.
    Returns each request's (tokens, prompt tokens served from the prefix cache)."""
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 1000, (24,), generator=g).tolist()
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (3, 17, 37, 9)]
    prompts += [shared + [5, 6], shared + [7]]
    out: dict[str, tuple[list[int], int]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
        if i < len(prompts) - 1:
            out |= {o.request_id: (o.token_ids, o.num_cached_tokens) for o in engine.step() if o.finished}
    while engine.has_unfinished_requests():
        out |= {o.request_id: (o.token_ids, o.num_cached_tokens) for o in engine.step() if o.finished}
    return out


def assert_same_as_eager(ckpt: Path, engine: LLMEngine, captured: CapturedDecode, **kw: Any) -> None:
    eager = make_engine(ckpt, **kw)
    want_logits, got_logits = record_logits(eager), record_logits(engine)
    want, got = workload(eager), workload(engine)
    assert got == want
    assert got["5"][1] >= 16  # the shared prefix's whole blocks were a hit
    assert captured.steps > 0
    assert len(got_logits) == len(want_logits)
    for g, w in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_static_forward_matches_eager_with_padding_prefix_hits_and_preemption(tiny_ckpt: Path) -> None:
    engine = make_engine(tiny_ckpt, "decode")
    captured = static_eager(engine)
    assert_same_as_eager(tiny_ckpt, engine, captured)
    # batches of 1 .. 4 rows ran, padded to the buckets 1, 2, 4; contexts up to 5+ blocks of 8
    assert {b for b, _ in captured.buckets} == {1, 2, 4}
    assert max(n for _, n in captured.buckets) >= 8
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks

    tight = make_engine(tiny_ckpt, "decode", num_kv_blocks=14)  # 112 slots for ~6 x 40: must preempt
    captured = static_eager(tight)
    assert_same_as_eager(tiny_ckpt, tight, captured, num_kv_blocks=14)
    assert tight.scheduler.num_preemptions > 0


def test_gemv_kernels_are_the_default_and_can_be_turned_off(
    tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The captured CPU step runs its forward with the small-batch kernels on (`compiled_gemv.options`,
    what the compiled graph is traced under) by default, and off with `gemv=False` or
    K2SERVE_DECODE_GEMV=0 (`compiled_gemv.DEFAULT_ON`); the same tokens either way."""
    from k2serve.model import compiled_gemv

    tokens = {}
    for default in (True, False):
        monkeypatch.setattr(compiled_gemv, "DEFAULT_ON", default)
        engine = make_engine(tiny_ckpt, "decode", max_num_seqs=1)
        captured = static_eager(engine)
        assert captured.gemv is default
        seen: list[int] = []
        forward = captured._compiled

        def spy(inputs: Any, forward: Any = forward, seen: list[int] = seen) -> torch.Tensor:
            seen.append(compiled_gemv.gather_rows(torch.float32))
            return forward(inputs)

        captured._compiled = spy
        engine.add_request("a", list(range(5, 15)), GREEDY)
        while engine.has_unfinished_requests():
            tokens[default] = [o.token_ids for o in engine.step() if o.finished] or tokens.get(default)
        assert captured.steps > 0 and set(seen) == {
            compiled_gemv.GATHER_MAX_ROWS[torch.float32] if default else 0
        }
        assert compiled_gemv.gather_rows(torch.float32) == 0  # off outside the step
    assert tokens[True] == tokens[False] and tokens[True]
    on = CapturedDecode(engine.model, engine.pool, captured.pad_slot, 1, 8, compile=False, gemv=True)
    assert on.gemv  # the argument wins over the default


def test_padding_rows_write_only_the_scratch_block(tiny_ckpt: Path) -> None:
    engine = make_engine(tiny_ckpt, "decode")
    captured = static_eager(engine)
    engine.add_request("a", list(range(5, 25)), GREEDY)
    engine.step()  # the prefill (eager)
    before = engine.pool.kv.clone()
    seq = engine.seqs["a"]
    rows = [RowSpec([seq.output_token_ids[-1]], seq.num_tokens - 1, seq.block_table, True)]
    decode = captured_rows(rows)
    assert decode is not None and len(decode) == 1
    captured.sizes = [2]  # one real row padded to a batch of 2
    logits = engine.runner.run(rows)
    assert logits.shape == (1, engine.model.config.vocab_size)
    slot = engine.pool.slot_mapping(seq.block_table, seq.num_tokens - 1, seq.num_tokens)
    changed = (engine.pool.kv != before).any(-1).flatten(1)  # [layers, slots]
    scratch = captured.pad_slot // engine.pool.block_size
    bs = engine.pool.block_size
    allowed = torch.zeros_like(changed[0])
    allowed[slot] = True
    allowed[scratch * bs : (scratch + 1) * bs] = True
    assert changed.any()
    assert not (changed & ~allowed).any()


def test_mixed_steps_run_eager_and_draft_rows_become_a_row_per_position() -> None:
    decode = RowSpec([3], 10, [0, 1], True)
    assert captured_rows([decode, decode]) is not None
    assert captured_rows([decode, RowSpec([3, 4], 10, [0, 1], True)]) is None  # a prefill chunk
    assert captured_rows([RowSpec([3], 10, [0, 1], False)]) is None
    drafts = RowSpec([3, 4, 5], 10, [0, 1], True, num_logits=3)  # verifying 2 drafts at positions 11, 12
    assert captured_rows([decode, drafts]) == [
        DecodeRow(3, 10, [0, 1]),
        DecodeRow(3, 10, [0, 1]),
        DecodeRow(4, 11, [0, 1]),
        DecodeRow(5, 12, [0, 1]),
    ]
    assert captured_rows([RowSpec([3, 4, 5], 10, [0, 1], True, num_logits=2)]) is None


def test_long_batches_run_eager(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_GATHER_BYTES of gathered keys (or the largest bucket of rows) a step runs eager."""
    import k2serve.engine.captured as captured_module
    from k2serve.engine.captured import DecodeRow

    engine = make_engine(tiny_ckpt, "decode")
    captured = static_eager(engine)
    rows = [DecodeRow(1, 30, [0, 1, 2, 3])]  # 4 blocks of 8: bucket 1 x 4 blocks
    assert captured.accepts(rows)
    assert not captured.accepts(rows * 5)  # more rows than max_num_seqs' bucket (4)
    row_bytes = engine.pool.row_width * engine.pool.kv.element_size()
    monkeypatch.setattr(captured_module, "MAX_GATHER_BYTES", 4 * 8 * row_bytes - 1)
    assert not captured.accepts(rows)


def test_inductor_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Inductor's caches go under ~/.cache/k2serve/inductor unless the user named a directory; the
    default torch writes into the variable itself counts as unnamed."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from k2serve.engine.captured import INDUCTOR_CACHE_ENV, use_inductor_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, default_cache_dir())
    use_inductor_cache()
    assert Path(os.environ[INDUCTOR_CACHE_ENV]) == tmp_path / "k2serve" / "inductor"
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(tmp_path / "mine"))
    use_inductor_cache()
    assert os.environ[INDUCTOR_CACHE_ENV] == str(tmp_path / "mine")


def test_buckets() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 8]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert [blocks_bucket(n) for n in (1, 2, 3, 5, 9)] == [2, 2, 4, 8, 16]


def test_config_and_flags() -> None:
    from k2serve.cli.parser import build_parser
    from k2serve.cli.settings import compile_mode, engine_args_from_up

    with pytest.raises(EngineConfigError, match="compile must be one of none, decode"):
        EngineConfig(compile="full")
    p = build_parser()
    base = ["serve", "--preset", "tiny"]
    assert compile_mode(p.parse_args(base)) == "none"
    assert compile_mode(p.parse_args([*base, "--compile", "decode"])) == "decode"
    assert compile_mode(p.parse_args([*base, "--enforce-eager"])) == "none"
    with pytest.raises(SystemExit):
        p.parse_args([*base, "--compile", "decode", "--enforce-eager"])
    gen = p.parse_args(["generate", "--model", "m", "--prompt", "x", "--compile", "decode"])
    assert compile_mode(gen) == "decode"
    up = p.parse_args(["up", "--preset", "tiny", "--compile", "decode"])
    args = engine_args_from_up(up)
    assert args[args.index("--compile") + 1] == "decode"


def test_unsupported_models_fall_back(tiny_int4_ckpt: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine = LLMEngine.from_pretrained(
        tiny_int4_ckpt, torch.float32, EngineConfig(num_kv_blocks=32, compile="decode")
    )
    assert engine.runner.captured is None
    assert "INT4 experts are captured on CUDA with --moe-backend triton" in caplog.text  # fp32: not native
    assert unsupported_reason(engine.model, engine.pool) is not None


@pytest.mark.parametrize(
    ("tokens", "dtype", "way"),
    [(1, torch.float32, "bmm"), (9, torch.float32, "loop"), (1, torch.float32, "gemv")]
    + [(2, torch.bfloat16, "gemv"), (5, torch.bfloat16, "gemv")]
    + ([(5, torch.float32, "grouped"), (5, torch.bfloat16, "grouped")] if HAS_GROUPED_MM else []),
)
def test_moe_forward_static_matches_eager(
    tokens: int, dtype: torch.dtype, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The static ways against eager: the grouped GEMM (compiled in the slow engine test), the gathered
    expert GEMVs of the captured CPU step (`compiled_gemv`, on for at most GATHER_MAX_ROWS[dtype] rows),
    and without the grouped GEMM gathered batched GEMVs (T*k < E) and the dense expert loop."""
    import k2serve.model.moe as moe_module
    from k2serve.model import compiled_gemv

    config = ModelConfig.from_dict(dict(PRESETS["tiny"]))
    torch.manual_seed(0)
    moe = MoE(config, dtype=dtype).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.05)
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(tokens, config.hidden_size).to(dtype)
    weights, ids = moe.gate(x)
    want = moe.experts(x, weights, ids)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if way in ("bmm", "loop"):
        monkeypatch.setattr(moe_module, "_grouped_mm", None)
    gathered = compiled_gemv.gathered_experts
    calls: list[int] = []

    def spy(*args: Any) -> torch.Tensor:
        calls.append(1)
        return gathered(*args)

    monkeypatch.setattr(compiled_gemv, "gathered_experts", spy)
    before = compiled_gemv.gather_rows(dtype)
    with compiled_gemv.options(way == "gemv"):
        got = moe.experts.forward_static(x, weights, ids)
    assert calls == ([1] if way == "gemv" else [])
    assert compiled_gemv.gather_rows(dtype) == before  # restored on exit
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def buffer_sizes(code: str) -> list[int]:
    """Elements of every buffer with a static shape that Inductor's generated CPU code allocates."""
    shapes = re.findall(r"empty_strided_cpu\(\(([0-9, ]*)\)", code)
    return [math.prod(int(d) for d in s.split(",") if d.strip()) for s in shapes]


@pytest.mark.slow
def test_compiled_decode_matches_eager(tiny_ckpt: Path) -> None:
    """torch.compile (Inductor) per batch bucket: two buckets (max_num_seqs=2), the same tokens and
    logits as eager over mixed contexts and a prefix hit. The KV write stays in place: no buffer of
    the generated code is as large as one layer of the pool (a write through a view of the pool once
    compiled to a copy of the layer and of the whole pool back, every step: ~4 s a token on `small`
    with a 2 GiB pool)."""
    kw: dict[str, Any] = {"max_num_seqs": 2, "num_kv_blocks": 2048}
    engine = make_engine(tiny_ckpt, "decode", **kw)
    captured = engine.runner.captured
    assert captured is not None and captured.sizes == [1, 2]
    assert captured.gemv  # the small-batch kernels (compiled_gemv) are on: bucket 1 gathers its experts
    with fresh_cache():  # generate the code here (a cache hit would not show it)
        _, code = run_and_get_code(assert_same_as_eager, tiny_ckpt, engine, captured, **kw)
    assert len(code) >= 2  # both buckets' graphs
    layer = engine.pool.num_slots * engine.pool.row_width
    sizes = [n for c in code for n in buffer_sizes(c)]
    assert sizes and max(sizes) < layer // 4, (max(sizes), layer)
    assert {b for b, _ in captured.buckets} == {1, 2}
    assert all(dataclasses.is_dataclass(b.inputs) for b in captured.buckets.values())


def test_int4_fused_experts_run_the_static_step_as_a_cuda_graph_would(tiny_int4_ckpt: Path) -> None:
    """INT4 experts are captured on CUDA with --moe-backend triton: the fused kernels (no host sync) are
    recorded in the CUDA graph as they are. Everything but the capture call runs here: the static step
    (padded buckets, static block tables, scratch-slot padding) with the fused INT4 kernels under the
    Triton interpreter gives the eager engine's tokens and logits; on CPU (Inductor does not trace the
    interpreter's kernels) and with the torch MoE the engine keeps INT4 eager."""
    engine = make_engine(tiny_int4_ckpt, moe_backend="triton")
    pad, seqs = engine.runner.pad_slot, engine.config.max_num_seqs
    captured = CapturedDecode(engine.model, engine.pool, pad, seqs, 8, compile=False)
    engine.runner.captured = captured
    assert_same_as_eager(tiny_int4_ckpt, engine, captured, moe_backend="triton")
    cuda_pool = SimpleNamespace(kv=SimpleNamespace(device=torch.device("cuda")), fp8=None)
    assert unsupported_reason(engine.model, cuda_pool) is None  # type: ignore[arg-type]
    assert "CUDA with --moe-backend triton" in (unsupported_reason(engine.model, engine.pool) or "")
    torch_moe = make_engine(tiny_int4_ckpt)
    assert unsupported_reason(torch_moe.model, cuda_pool) is not None  # type: ignore[arg-type]


def test_step_weight_bytes(tiny_ckpt: Path) -> None:
    """`bench captured`'s GB/s numerator: a batch-1 step reads all weights but the unused routed experts
    (k of E per MoE layer) and all but one embedding row; more rows read more distinct experts."""
    from k2serve.bench.captured import step_weight_bytes
    from k2serve.model.moe import RoutedExperts

    model = make_engine(tiny_ckpt).model
    cfg = model.config
    everything = sum(p.numel() * p.element_size() for p in [*model.parameters(), *model.buffers()])
    experts = sum(
        p.numel() * p.element_size()
        for m in model.modules()
        if isinstance(m, RoutedExperts)
        for p in m.parameters()
    )
    table = model.embed_tokens.weight
    row = table.shape[1] * table.element_size()
    unused = experts * (1 - cfg.num_experts_per_tok / cfg.n_routed_experts)
    assert step_weight_bytes(model, 1) == pytest.approx(
        everything - unused - table.numel() * table.element_size() + row
    )
    assert step_weight_bytes(model, 1) < step_weight_bytes(model, 4) < everything
