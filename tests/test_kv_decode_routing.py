"""Decode-worker choice by KV pressure and predicted TPOT (pure, synthetic loads), the decode step the
engine measures for it, and the lease keys of whole-history conversations (issue 18 items 2 and 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from k2serve.engine.config import EngineConfig
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.sampling_params import SamplingParams
from k2serve.proto import registry_pb2
from k2serve.router.kv_index import KVIndex
from k2serve.router.lease_keys import LeaseKeys
from k2serve.router.policy import (
    DEFAULT_DECODE_STEP_MS,
    KVAware,
    LeastLoaded,
    PromptBlocks,
    choose_decode,
    kv_fits,
    predicted_tpot_ms,
)
from k2serve.router.registry import Worker

BS = 4


def _decode(
    worker_id: str,
    free: int = 100,
    total: int = 100,
    step_ms: float = 0.0,
    batch: float = 0.0,
    running: int = 0,
    leased: int = 0,
) -> Worker:
    info = registry_pb2.WorkerInfo(worker_id=worker_id, role=registry_pb2.WORKER_ROLE_DECODE, block_size=BS)
    load = registry_pb2.WorkerLoad(
        free_blocks=free,
        total_blocks=total,
        decode_step_ms=step_ms,
        decode_step_batch=batch,
        running=running,
        leased_blocks=leased,
    )
    return Worker(worker_id, "decode", "-", info, channel=None, load=load, ready=True)  # type: ignore[arg-type]


def test_predicted_tpot_scales_with_a_larger_batch_only() -> None:
    assert predicted_tpot_ms(20.0, 4.0, 0) == 20.0  # a smaller batch: never below the measured step
    assert predicted_tpot_ms(20.0, 4.0, 3) == 20.0  # joins as the 4th: the measured batch
    assert predicted_tpot_ms(20.0, 4.0, 7) == pytest.approx(40.0)  # 8 sequences: twice the batch
    assert predicted_tpot_ms(10.0, 0.0, 1) == pytest.approx(20.0)  # batch < 1 counts as 1


def test_kv_fits_counts_free_and_leased_blocks() -> None:
    # 30 tokens of context = ceil(30 / 4) = 8 blocks
    assert kv_fits(_decode("a", free=8), 30)
    assert not kv_fits(_decode("a", free=7), 30)
    assert kv_fits(_decode("a", free=5, leased=3), 30)  # leases give way to a request
    assert kv_fits(_decode("a", free=0, total=0), 10**6)  # reports no pool (static): assumed to fit


def test_decode_choice_is_argmin_predicted_tpot() -> None:
    fast_busy = _decode("a", step_ms=10.0, batch=2.0, running=8)  # 10 * 9 / 2 = 45 ms
    slow_idle = _decode("b", step_ms=30.0, batch=1.0, running=0)  # 30 ms
    c = choose_decode([fast_busy, slow_idle], 30)
    assert (c.worker.worker_id, c.reason, c.predicted_tpot_ms) == ("b", "tpot", pytest.approx(30.0))
    fast_busy.load.running = 4  # 10 * 5 / 2 = 25 ms
    c = choose_decode([fast_busy, slow_idle], 30)
    assert (c.worker.worker_id, c.predicted_tpot_ms) == ("a", pytest.approx(25.0))
    # the router's in-flight requests count when above the reported batch (fresher between heartbeats)
    fast_busy.in_flight = 6  # 10 * 7 / 2 = 35 ms
    assert choose_decode([fast_busy, slow_idle], 30).worker.worker_id == "b"


def test_decode_choice_refuses_a_worker_whose_kv_cannot_hold_the_context() -> None:
    fast_full = _decode("a", free=5, step_ms=5.0, batch=1.0)
    slow_room = _decode("b", free=50, step_ms=50.0, batch=1.0)
    # 20 tokens (5 blocks) fit both: the faster one
    assert (choose_decode([fast_full, slow_room], 20).worker.worker_id, "tpot") == ("a", "tpot")
    # 21 tokens (6 blocks) do not fit a's 5 free blocks
    c = choose_decode([fast_full, slow_room], 21)
    assert (c.worker.worker_id, c.reason) == ("b", "kv_pressure")
    # none fits: the one with the most free blocks, whose Reserve decides
    c = choose_decode([fast_full, slow_room], 1000)
    assert (c.worker.worker_id, c.reason, c.predicted_tpot_ms) == ("b", "no_kv_fit", None)
    assert choose_decode([fast_full], 1000).reason == "only_worker"


def test_unmeasured_workers_borrow_the_mean_step_and_ties_go_to_load() -> None:
    a, b = _decode("a"), _decode("b")
    c = choose_decode([b, a], 10)
    assert (c.worker.worker_id, c.predicted_tpot_ms) == ("a", pytest.approx(DEFAULT_DECODE_STEP_MS))
    a.routed = 1  # idle workers take turns
    assert choose_decode([a, b], 10).worker.worker_id == "b"
    # a measured worker lends its step to an unmeasured one: b (no measurement, running 3) is
    # predicted 12 * 4 / 2 = 24 ms, c (measured 20 ms at batch 2, idle) 20 ms
    b.load.running = 3
    measured = _decode("c", step_ms=20.0, batch=2.0)
    # the mean of the measured: 20 ms at batch 2
    assert choose_decode([b, measured], 10).worker.worker_id == "c"
    measured.load.decode_step_ms = 4.0  # b: 4 * 4 / 2 = 8 ms, c: 4 ms
    assert choose_decode([b, measured], 10).predicted_tpot_ms == pytest.approx(4.0)


def test_kv_policy_routes_decode_by_tpot_and_others_stay_least_loaded() -> None:
    prompt = PromptBlocks(list(range(20)))
    a = _decode("a", free=10, step_ms=5.0, batch=1.0)
    b = _decode("b", free=100, step_ms=50.0, batch=1.0)
    kv = KVAware(KVIndex())
    c = kv.choose([a, b], "decode", prompt=prompt, max_tokens=8)  # 28 tokens: 7 blocks, a fits
    assert (c.worker.worker_id, c.reason) == ("a", "tpot")
    c = kv.choose([a, b], "decode", prompt=prompt, max_tokens=30)  # 50 tokens: 13 blocks, only b
    assert (c.worker.worker_id, c.reason) == ("b", "kv_pressure")
    assert kv.choose([a, b], "decode", frozenset({"b"}), prompt, 30).reason == "only_worker"
    # without a prompt (and under least-loaded) the decode choice is by load alone
    assert kv.choose([a, b], "decode").reason == "load"
    ll = LeastLoaded().choose([a, b], "decode", prompt=prompt, max_tokens=30)
    assert (ll.worker.worker_id, ll.reason) == ("b", "load")  # b has more free blocks: load_key


def test_engine_measures_decode_steps_only(tiny_ckpt: Path) -> None:
    llm = LLMEngine.from_pretrained(tiny_ckpt, torch.float32, EngineConfig(num_kv_blocks=64, block_size=BS))
    assert llm.decode_step_ms == 0.0 and llm.decode_step_batch == 0.0
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.add_request("a", list(range(1, 10)), params)
    llm.add_request("b", list(range(20, 25)), params)
    llm.step()  # both prompts: a prefill step, not a decode step
    assert llm.decode_step_ms == 0.0
    llm.step()  # both decode
    assert llm.decode_step_ms > 0 and llm.decode_step_batch == 2.0
    while llm.has_unfinished_requests():
        llm.step()
    assert llm.decode_step_ms > 0 and llm.decode_step_batch == pytest.approx(2.0)


# ---- lease keys of whole-history conversations -----------------------------------------------------------
def test_lease_key_follows_a_whole_history_conversation() -> None:
    keys = LeaseKeys()
    assert keys.key_for([], matched=True) is None
    assert keys.key_for([1, 2], matched=False) is None  # nothing cached, nothing to continue: no lease
    k = keys.key_for([1, 2, 3], matched=True)  # a live prefix: a conversation starts, keyed by its end
    assert k == "kv-0000000000000003"
    # its next turns contain the previous turn's last block: the same key, even when nothing is live
    assert keys.key_for([1, 2, 3, 4, 5], matched=False) == k
    assert keys.key_for([1, 2, 3, 4, 5, 6], matched=False) == k
    assert len(keys) == 1  # one conversation: its latest end only
    # another conversation sharing the first blocks (a system prompt) but not the end: its own key
    other = keys.key_for([1, 2, 7, 8], matched=True)
    assert other == "kv-0000000000000008" and other != k
    assert keys.key_for([1, 2, 3, 4, 5, 6, 9], matched=False) == k
    assert keys.key_for([1, 2, 7, 8, 10], matched=False) == other
    assert keys.key_for([-1], matched=True) == "kv-ffffffffffffffff"  # hashes are signed 64-bit


def test_lease_keys_are_bounded() -> None:
    keys = LeaseKeys(max_conversations=2)
    a = keys.key_for([1], matched=True)
    keys.key_for([2], matched=True)
    keys.key_for([3], matched=True)  # a is forgotten (least recently used)
    assert len(keys) == 2
    assert keys.key_for([1, 4], matched=False) is None
    assert a is not None and keys.key_for([2, 5], matched=False) == "kv-0000000000000002"
    with pytest.raises(ValueError, match="max_conversations"):
        LeaseKeys(0)


def test_a_prefilled_request_does_not_end_leases_it_leaves_room_for(tiny_ckpt: Path) -> None:
    """On a decode worker a request arrives with its blocks already reserved (prefilled elsewhere): it
    waits for the scheduler holding them, so it must not count as a request that cannot get blocks and
    end a session's lease (before the fix, every large enough transfer ended the decode worker's leases)."""
    config = EngineConfig(num_kv_blocks=16, block_size=BS, kv_session_lease_s=60.0)
    llm = LLMEngine.from_pretrained(tiny_ckpt, torch.float32, config)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    llm.add_request("turn1", list(range(1, 18)), params, session_id="s")
    while llm.has_unfinished_requests():
        llm.step()
    assert llm.leases is not None and llm.leases.leases.num_leased_blocks == 4  # (17 + 2 - 1) // 4 full
    prompt = list(range(100, 140))  # 40 tokens: 10 of the 12 blocks the lease leaves free
    table = llm.blocks.allocate_fresh(len(prompt))
    assert llm.add_prefilled_request("big", prompt, 7, params, table) is None
    llm.step()
    assert llm.leases.leases.num_leased_blocks == 4 and "s" in llm.leases.leases
    while llm.has_unfinished_requests():
        llm.step()
