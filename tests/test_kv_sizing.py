"""The KV pool sized from a memory budget (weights counted, activations profiled), startup refusals
naming the numbers, and requests longer than the pool can ever hold refused up front."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from conftest import grpc_server_in_thread, tiny_api_server

from k2serve.capacity.memory import Layout, Workload, activation_bytes
from k2serve.cli.parser import build_parser
from k2serve.cli.settings import engine_config
from k2serve.engine.async_engine import AsyncEngine
from k2serve.engine.config import EngineConfig, EngineConfigError
from k2serve.engine.kv_sizing import model_bytes, profile_activations
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.protocol import InvalidRequestError
from k2serve.engine.sampling_params import SamplingParams
from k2serve.kvcache.pool import KVCachePool
from k2serve.model.loader import load_model
from k2serve.proto import api_pb2, api_pb2_grpc
from k2serve.router.grpc_api import K2ServeServicer

MiB = 1 << 20


@pytest.fixture(scope="module")
def model(tiny_ckpt: Path) -> object:
    return load_model(tiny_ckpt, torch.float32)


def per_block(model: object, block_size: int = 8) -> int:
    mc = model.config  # type: ignore[attr-defined]
    return KVCachePool.block_bytes(mc.num_hidden_layers, block_size, mc.kv_cache_dim, torch.float32)


def test_pool_from_a_memory_budget(model: object) -> None:
    cfg = EngineConfig(
        block_size=8,
        memory_budget_bytes=64 * MiB,
        max_num_batched_tokens=256,
        max_num_seqs=4,
        max_model_len=2048,
    )
    engine = LLMEngine(model, cfg)  # type: ignore[arg-type]
    s = engine.kv_sizing
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])  # type: ignore[attr-defined]
    assert s.weights == weights == model_bytes(model)  # type: ignore[arg-type]
    mc = model.config  # type: ignore[attr-defined]
    estimate = activation_bytes(
        mc, Layout(), Workload(max_model_len=256, max_num_batched_tokens=256, max_num_seqs=4,
                               kv_bytes=4, act_bytes=4)
    )  # fmt: skip
    assert s.activations >= estimate > 0 and "estimated on cpu" in s.how
    assert s.num_blocks == (64 * MiB - weights - s.activations) // per_block(model) - 1
    assert engine.blocks.num_blocks == s.num_blocks and engine.pool.num_blocks == s.num_blocks + 1
    assert engine.max_model_len == 2048
    assert s.num_blocks * 8 > 2048  # the budget holds more than one max-length sequence


def test_profile_runs_a_max_batch_forward(model: object) -> None:
    activations, how = profile_activations(model, EngineConfig(max_num_batched_tokens=64, max_num_seqs=64))  # type: ignore[arg-type]
    assert activations > 0 and "64-token forward" in how


def test_startup_refuses_a_budget_without_room_for_one_sequence(model: object) -> None:
    weights = model_bytes(model)  # type: ignore[arg-type]
    cfg = EngineConfig(block_size=8, memory_budget_bytes=weights + 2 * MiB, max_model_len=4096)
    with pytest.raises(EngineConfigError) as info:
        LLMEngine(model, cfg)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "cannot hold one 4096-token sequence" in msg and "weights" in msg and "activations" in msg
    assert f"{4096 // 8} blocks of {per_block(model)} bytes" in msg


def test_startup_refuses_max_model_len_over_the_pool(model: object) -> None:
    with pytest.raises(
        EngineConfigError, match=r"one 512-token sequence: .* leaves 20 blocks \(160 tokens\)"
    ):
        LLMEngine(model, EngineConfig(num_kv_blocks=20, block_size=8, max_model_len=512))  # type: ignore[arg-type]
    with pytest.raises(EngineConfigError, match="give one of"):
        EngineConfig(kv_cache_bytes=MiB, memory_budget_bytes=64 * MiB)


def test_request_longer_than_the_pool_is_refused_up_front(model: object) -> None:
    """Before: the request was queued and the engine's step raised (or it waited forever)."""
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=4, block_size=4))  # type: ignore[arg-type]
    assert engine.max_model_len == 16  # 4 blocks of 4: the model's positions are more
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("big", list(range(1, 31)), params)
    assert (info.value.param, info.value.value, info.value.limit) == ("prompt_token_ids", 30, 16)
    assert "30 tokens" in str(info.value) and "16" in str(info.value)
    assert not engine.has_unfinished_requests()
    engine.add_request("fits", list(range(1, 13)), params)  # 12 + 4 = 16: runs alone
    while engine.has_unfinished_requests():
        engine.step()


def test_http_400_names_both_numbers(tiny_ckpt: Path) -> None:
    with tiny_api_server(tiny_ckpt, config=EngineConfig(num_kv_blocks=8, block_size=8)) as (url, _):
        r = httpx.post(
            f"{url}/v1/completions", json={"model": "tiny", "prompt": list(range(1, 101)), "max_tokens": 4}
        )
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "64 tokens" in msg and "100" in msg


def test_grpc_invalid_argument_names_both_numbers(tiny_ckpt: Path) -> None:
    engine = AsyncEngine.from_pretrained(
        tiny_ckpt, torch.float32, EngineConfig(num_kv_blocks=8, block_size=8)
    )
    engine.start()
    servicer = K2ServeServicer(engine)
    try:
        with (
            grpc_server_in_thread(lambda s: api_pb2_grpc.add_K2ServeServicer_to_server(servicer, s)) as srv,
            grpc.insecure_channel(srv.target) as channel,
        ):
            req = api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=list(range(1, 101))))
            req.sampling.max_tokens = 4
            with pytest.raises(grpc.RpcError) as info:
                list(api_pb2_grpc.K2ServeStub(channel).Generate(req, timeout=60))
    finally:
        engine.shutdown()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "100 tokens" in info.value.details() and "64" in info.value.details()


def test_command_line_budget() -> None:
    args = build_parser().parse_args(["serve", "--preset", "tiny", "--memory-budget-mb", "512"])
    cfg = engine_config(args)
    assert (cfg.memory_budget_bytes, cfg.kv_cache_bytes) == (512 * MiB, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["serve", "--preset", "tiny", "--memory-budget-mb", "512", "--kv-cache-mb", "8"]
        )


def test_device_free_memory_caps_the_budget() -> None:
    """On CUDA the KV bytes are min(budget - weights - activations, free after the weights - activations)."""
    from k2serve.engine.kv_sizing import budget_kv_bytes

    kv, how = budget_kv_bytes(100, 30, 10, None)
    assert kv == 60 and how.startswith("memory budget")
    assert budget_kv_bytes(100, 30, 10, 1000)[0] == 60  # the device has room: the budget decides
    kv, how = budget_kv_bytes(100, 30, 10, 40)  # 40 free after the weights: 30 for KV
    assert kv == 30 and how.startswith("device free")


def test_size_kv_asks_the_device_for_free_memory(model: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA code path with the numbers passed in: a device with less free memory than the budget
    leaves gets a smaller pool, and the refusal names the device's free memory."""
    import k2serve.engine.kv_sizing as kv_sizing

    asked: list[torch.device] = []

    def free(device: torch.device) -> int:
        asked.append(device)
        return 40 * MiB

    monkeypatch.setattr(kv_sizing, "free_device_bytes", free)
    cfg = EngineConfig(block_size=8, memory_budget_bytes=1 << 40, max_num_batched_tokens=64, max_num_seqs=4)
    s = kv_sizing.size_kv(model, cfg)  # type: ignore[arg-type]
    assert asked == [torch.device("cpu")]
    assert s.num_blocks == (40 * MiB - s.activations) // per_block(model) - 1
    monkeypatch.setattr(kv_sizing, "free_device_bytes", lambda device: 1 * MiB)
    with pytest.raises(EngineConfigError, match="device free"):
        kv_sizing.size_kv(model, dataclasses.replace(cfg, max_model_len=4096))  # type: ignore[arg-type]
