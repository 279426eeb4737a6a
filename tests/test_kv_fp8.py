"""The fp8 latent KV cache (kvcache/fp8.py, --kv-cache-dtype fp8): the format's error bound, the pool
and sizing in fp8 bytes, the disaggregated handoff of fp8 rows (in process and over a 1P1D cluster)
giving the single-engine fp8 tokens, and the registry refusing to pair different cache dtypes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from cluster_calls import http_greedy
from conftest import local_cluster_spec, run_all

from k2serve.cluster.local import LocalCluster
from k2serve.config import ModelConfig
from k2serve.engine.config import EngineConfig, EngineConfigError
from k2serve.engine.llm import LLM
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.sampling_params import SamplingParams
from k2serve.kvcache.fp8 import FP8_MAX, Fp8Layout
from k2serve.kvcache.pool import KVCachePool
from k2serve.proto import registry_pb2
from k2serve.router.registry import WorkerTable

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def test_k2_row_is_vllms_656_byte_fp8_ds_mla_row() -> None:
    k2 = Fp8Layout(512, 64)
    assert (k2.rope_offset, k2.scale_bytes, k2.row_bytes) == (528, 16, 656)
    # per token over K2's 61 layers: 40,016 bytes against bf16's 70,272 (57%)
    assert 61 * k2.row_bytes == 40_016


def test_round_trip_error_bound() -> None:
    """c_kv: |x - x'| <= max(|x| 2^-4, scale 2^-10) with scale = amax / 448 (so <= amax 2^-4);
    k_pe: bf16 rounding; the scale is in every one of vLLM's per-128 scale slots."""
    layout = Fp8Layout(512, 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 576, generator=g) * torch.logspace(-3, 3, 300)[:, None]  # 6 decades of token scale
    x[7, :512] = 0.0  # an all-zero latent keeps scale 1 and comes back exactly
    rows = layout.quantize(x)
    assert rows.dtype == torch.uint8 and rows.shape == (300, 656)
    y = layout.dequantize(rows, torch.float32)
    c, cq = x[:, :512], y[:, :512]
    amax = c.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, 1.0)
    bound = torch.maximum(c.abs() * 2**-4, scale * 2**-10)
    assert bool(((c - cq).abs() <= bound * (1 + 1e-6)).all())
    assert bool(((c - cq).abs() <= amax * 2**-4 + 1e-30).all())
    assert float((c - cq).abs().max() / amax.max()) > 2**-8  # it is lossy: the bound is not vacuous
    assert torch.equal(y[:, 512:], x[:, 512:].to(torch.bfloat16).float())
    assert torch.equal(y[7, :512], torch.zeros(512))
    scales = rows[:, 512:528].contiguous().view(torch.float32)  # [300, 4]
    assert torch.equal(scales, scale.expand(300, 4))


def test_pool_writes_fp8_rows_and_reads_them_per_tile() -> None:
    layout = Fp8Layout(64, 16)
    pool = KVCachePool(2, 5, 4, 80, torch.float32, fp8=layout)
    assert pool.kv.dtype == torch.uint8 and pool.row_width == layout.row_bytes == 112
    assert pool.bytes_per_block == 2 * 4 * 112 and pool.cache_dtype == "fp8"
    values = torch.randn(3, 80)
    slots = torch.tensor([2, 9, 17])
    pool.write(1, slots, values)
    raw = pool.layer_rows(1)[slots]
    assert torch.equal(raw, layout.quantize(values))
    assert torch.equal(pool.dequantize(raw), layout.dequantize(raw, torch.float32))
    other = KVCachePool(2, 5, 4, 80, torch.float32, fp8=layout)
    other.write_rows(1, slots, raw)  # a received row lands as it was sent
    assert torch.equal(other.layer_rows(1)[slots], raw)
    with pytest.raises(ValueError, match="fp8 cache"):
        other.write_rows(1, slots, values)  # values are not rows


def tiny_engine(ckpt: Path, kv_cache_dtype: str, **kw: Any) -> LLMEngine:
    base = {"num_kv_blocks": 256, "block_size": 8, "max_num_batched_tokens": 96}
    return LLMEngine.from_pretrained(
        ckpt, torch.float32, EngineConfig(kv_cache_dtype=kv_cache_dtype, **(base | kw))
    )


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 1024, (int(k),), generator=g).tolist()
        for k in torch.randint(5, 60, (n,), generator=g)
    ]


def test_engine_config_and_sizing_count_fp8_bytes(tiny_ckpt: Path) -> None:
    with pytest.raises(EngineConfigError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="int8")
    mc = ModelConfig.from_file(tiny_ckpt)
    budget = 1 << 20
    fp8 = tiny_engine(tiny_ckpt, "fp8", num_kv_blocks=None, kv_cache_bytes=budget, max_model_len=512)
    f32 = tiny_engine(tiny_ckpt, "auto", num_kv_blocks=None, kv_cache_bytes=budget, max_model_len=512)
    bf16 = tiny_engine(tiny_ckpt, "bf16", num_kv_blocks=None, kv_cache_bytes=budget, max_model_len=512)
    row = Fp8Layout(mc.kv_lora_rank, mc.qk_rope_head_dim).row_bytes  # 64 + 16 + 32 = 112 for tiny
    per_block = mc.num_hidden_layers * 8 * row
    assert fp8.pool.bytes_per_block == per_block and fp8.blocks.num_blocks == budget // per_block - 1
    assert bf16.pool.kv.dtype == torch.bfloat16 and f32.pool.kv.dtype == torch.float32
    assert fp8.blocks.num_blocks > bf16.blocks.num_blocks > f32.blocks.num_blocks
    geometry = fp8.kv_geometry
    assert (geometry.kv_dim, geometry.dtype, geometry.cache_dtype) == (row, torch.uint8, "fp8")
    assert geometry.bytes_per_token == mc.num_hidden_layers * row


def test_fp8_handoff_in_process_equals_one_fp8_engine(tiny_ckpt: Path) -> None:
    """A prefill engine's fp8 rows (the kv_sink gets the pool's raw rows) written into a second fp8
    engine give the tokens one fp8 engine gives; the fp8 engine's tokens mostly follow fp32's."""
    ps = prompts(4, seed=3)
    single = tiny_engine(tiny_ckpt, "fp8")
    for i, p in enumerate(ps):
        single.add_request(str(i), p, GREEDY)
    expected = run_all(single)
    prefill, decode = tiny_engine(tiny_ckpt, "fp8", max_num_batched_tokens=32), tiny_engine(tiny_ckpt, "fp8")
    received: dict[str, dict[int, torch.Tensor]] = {str(i): {} for i in range(len(ps))}
    for i, p in enumerate(ps):
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        prefill.add_request(
            str(i), p, one, kv_sink=lambda layer, kv, r=str(i): received[r].__setitem__(layer, kv)
        )
    first = {rid: toks[0] for rid, toks in run_all(prefill).items()}
    for i, p in enumerate(ps):
        rid = str(i)
        assert received[rid][0].dtype == torch.uint8 and received[rid][0].shape == (
            len(p),
            decode.pool.row_width,
        )
        reservation = decode.reserve_kv(len(p))
        for layer, kv in received[rid].items():
            reservation.write(layer, kv)
        decode.add_prefilled_request(rid, p, first[rid], GREEDY, reservation.block_table)
    assert run_all(decode) == expected


def test_registry_refuses_to_pair_different_cache_dtypes() -> None:
    table = WorkerTable(5.0, lambda address: None)  # type: ignore[arg-type,return-value]

    def info(wid: str, role: int, dtype: str, dim: int) -> registry_pb2.WorkerInfo:
        return registry_pb2.WorkerInfo(
            worker_id=wid, role=role, grpc_address=f"{wid}:1", num_layers=3, kv_dim=dim, kv_dtype=dtype
        )

    table.add(info("p0", registry_pb2.WORKER_ROLE_PREFILL, "fp8", 112))
    table.add(info("d0", registry_pb2.WORKER_ROLE_DECODE, "fp8", 112))
    with pytest.raises(
        ValueError, match=r"decode worker 'd1' cannot be paired with prefill worker 'p0'.*bfloat16.*fp8"
    ):
        table.add(info("d1", registry_pb2.WORKER_ROLE_DECODE, "bfloat16", 80))
    table.add(info("p1", registry_pb2.WORKER_ROLE_PREFILL, "fp8", 112))  # same format: fine
    assert sorted(table.workers) == ["d0", "p0", "p1"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "grpc"])
def test_fp8_cluster_handoff_equals_single_process_fp8_engine(
    tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory, backend: str
) -> None:
    """1P1D with --kv-cache-dtype fp8 on both workers: the KV transfer ships the fp8 rows (bytes
    moved = tokens x layers x the fp8 row), and the tokens equal the single-process fp8 engine's;
    torch.distributed receives in place into the decode pool, gRPC through KVReservation.write."""
    engine_args = ("--kv-cache-mb", "32", "--block-size", "8", "--kv-cache-dtype", "fp8")
    spec = local_cluster_spec(
        tiny_ckpt, tmp_path_factory.mktemp("up-fp8"), engine_args=engine_args, transfer_backend=backend
    )
    ps = prompts(6, seed=5)
    max_tokens = [4 + i % 5 for i in range(6)]
    llm = LLM(tiny_ckpt, engine_config=EngineConfig(num_kv_blocks=512, block_size=8, kv_cache_dtype="fp8"))
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    expected = [o.token_ids for o in llm.generate(ps, params)]
    mc = ModelConfig.from_file(tiny_ckpt)
    with LocalCluster(spec) as c:
        client = openai.AsyncOpenAI(base_url=f"{c.http_url}/v1", api_key="unused", max_retries=0)

        async def run() -> list[list[int]]:
            return await asyncio.gather(
                *(http_greedy(client, tiny_ckpt.name, p, m) for p, m in zip(ps, max_tokens, strict=True))
            )

        assert asyncio.run(run()) == expected
        moved = httpx.get(f"{c.http_url}/cluster/workers").json()["kv_bytes_transferred"]
        row = Fp8Layout(mc.kv_lora_rank, mc.qk_rope_head_dim).row_bytes
        assert moved == sum(len(p) for p in ps) * mc.num_hidden_layers * row


def test_capacity_model_counts_the_same_fp8_row() -> None:
    from k2serve.capacity.memory import fp8_row_bytes

    for rank, rope in ((512, 64), (256, 32), (64, 16), (8, 4)):
        assert fp8_row_bytes(rank, rope) == Fp8Layout(rank, rope).row_bytes


def test_cli_flag_reaches_the_engine_config() -> None:
    from k2serve.cli.parser import KV_CACHE_DTYPES, build_parser
    from k2serve.cli.settings import engine_args_from_up, engine_config
    from k2serve.kvcache.fp8 import CACHE_DTYPES

    assert KV_CACHE_DTYPES == CACHE_DTYPES
    args = build_parser().parse_args(["serve", "--preset", "tiny", "--kv-cache-dtype", "fp8"])
    assert engine_config(args).kv_cache_dtype == "fp8"
    up = build_parser().parse_args(["up", "--preset", "tiny", "--kv-cache-dtype", "fp8"])
    passed = engine_args_from_up(up)
    assert passed[passed.index("--kv-cache-dtype") + 1] == "fp8"


@pytest.mark.slow
def test_fp8_against_bf16_cache_on_tiny(tiny_ckpt: Path) -> None:
    """The benchmark's figures (BENCHMARKS.md, 256 tokens there) on 24 tokens, with loose bounds:
    the fp8 cache's logits stay close to the bf16 cache's and greedy mostly agrees teacher-forced;
    its error is ~16-32x the bf16 cache's against an fp32 cache (e4m3's 3 mantissa bits vs 7)."""
    from k2serve.bench.kv_fp8 import compare
    from k2serve.model.loader import load_model

    model = load_model(tiny_ckpt, torch.float32)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(model.config.vocab_size, (64,), generator=g).tolist()
    r = compare(model, prompt, 24)
    assert r["teacher_forced_top1_agreement"] >= 0.75, r
    assert r["mean_abs_logit_error"] < 0.5, r
    ratio = r["prefill_mean_abs_logit_error_fp8_vs_fp32"] / r["prefill_mean_abs_logit_error_bf16_vs_fp32"]
    assert 4 < ratio < 64, r


def test_speed_mode_times_both_pools_over_the_same_latent(tmp_path: Path) -> None:
    """`kv_fp8 --speed` at a 256-token context, 4 rounds: both pools are timed every round and read the
    same cached latent (their first-step logits differ only by the fp8 rounding: not at all would mean
    one pool was not read, far would mean they held different latents)."""
    from k2serve.bench.kv_fp8 import speed
    from k2serve.bench.long_context import write_long_bench_checkpoint
    from k2serve.model.loader import load_model

    model = load_model(write_long_bench_checkpoint(tmp_path), torch.float32)
    r = speed(model, 256, 4)
    assert r["context"] == 256 and r["rounds"] == 4
    for name in ("bf16", "fp8"):
        lo, hi = r[f"{name}_ms_min_max"]
        assert 0 < lo <= r[f"{name}_ms"] <= hi
    q1, q3 = r["fp8_over_bf16_iqr"]
    assert 0 < q1 <= r["fp8_over_bf16"] <= q3
    assert 0 < r["max_abs_logit_diff"] < 1.0, r
