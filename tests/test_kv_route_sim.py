"""The routing replay of `k2serve.bench.kv_route_sim` (a diagnosis aid for KV-aware routing): its caches
behave as the ideal LRU, and the loss causes add up per request."""

from __future__ import annotations

import pytest

from k2serve.bench.kv_route_sim import SimRecord, losses, simulate
from k2serve.loadgen.trace import ideal_cache_hits
from k2serve.router.policy import PromptBlocks

BS = 4


def _conversation(tag: int, turns: int, arrival: float) -> list[tuple[float, list[int]]]:
    """`turns` prompts of one conversation, each the previous plus 8 tokens (a shared first block: 4 of
    the first prompt's 41 tokens, under KVAware's 10% share for a new conversation)."""
    history = [1, 1, 1, 1] + [tag] * 36
    out = []
    for t in range(turns):
        out.append((arrival + t, list(history) + [tag + 1]))
        history += [tag + 2 + t] * 8
    return out


def test_one_worker_is_the_ideal_lru_and_kv_keeps_conversations_apart() -> None:
    prompts = sorted(_conversation(100, 4, 0.0) + _conversation(200, 4, 0.5))
    hashes = [PromptBlocks(p).hashes(BS) for _, p in prompts]
    for capacity in (6, 40):
        ideal = ideal_cache_hits([[(h, BS) for h in hs] + [(0, 1)] for hs in hashes], BS, capacity)
        recs = simulate("kv", prompts, 1, capacity, BS, 1e6)
        assert [r.actual for r in recs] == ideal
        assert all(r.ideal == r.actual and r.worker == "prefill-0" for r in recs)
    # two workers of 20 blocks: kv places the two conversations apart (cache balance) and each turn with
    # its holder, so every later turn hits its whole history
    kv = simulate("kv", prompts, 2, 20, BS, 1e6)
    assert [r.actual for r in kv] == [0, 0, 40, 40, 48, 48, 56, 56]  # the 2nd starts on the empty worker
    assert len({r.worker for r in kv[0::2]}) == 1 and {r.worker for r in kv[0::2]} != {
        r.worker for r in kv[1::2]
    }
    # by TTFT alone (kv-ttft) the second conversation joins the first for its cached shared block, and
    # the two evict each other's history on one worker while the other's cache stays empty
    ttft = simulate("kv-ttft", prompts, 2, 20, BS, 1e6)
    assert [r.actual for r in ttft] == [0, 4, 40, 36, 36, 28, 28, 20]
    assert {r.worker for r in ttft} == {"prefill-0"}


def test_losses_by_cause() -> None:
    recs = [
        SimRecord(0, "a", predicted=16, actual=16, holder_tokens=32, ideal=32, ttft_s=0.0),  # moved 16
        SimRecord(1, "a", predicted=32, actual=16, holder_tokens=32, ideal=48, ttft_s=0.0),  # raced, evicted
        SimRecord(2, "b", predicted=8, actual=8, holder_tokens=8, ideal=0, ttft_s=0.0),  # gained
    ]
    assert losses(recs) == {"moved": 16, "raced": 16, "evicted": 16, "gained": 8}


def test_a_shared_store_serves_every_worker_and_the_best_counts_it() -> None:
    """With a store (`store_blocks`), a turn that lands on another worker than its history's fetches the
    history from the store: round-robin, which alternates the turns of a conversation between two
    workers, then hits every turn's whole history (without the store, only the turns back on their
    first worker hit); the best counts the store's blocks with the pools'; a store too small to hold a
    history past the pools serves only what it keeps (its LRU)."""
    prompts = _conversation(100, 4, 0.0)
    alone = simulate("round-robin", prompts, 2, 20, BS, 1e6)
    assert [r.actual for r in alone] == [0, 0, 40, 48]  # turns 2 and 4 on prefill-1, 1 and 3 on prefill-0
    assert [r.worker for r in alone] == ["prefill-0", "prefill-1", "prefill-0", "prefill-1"]
    stored = simulate("round-robin", prompts, 2, 20, BS, 1e6, store_blocks=64)
    assert [r.actual for r in stored] == [r.ideal for r in stored] == [0, 40, 48, 56]
    # turn 2 (49 tokens): 9 computed, 40 fetched at 0.3 of computing them
    assert stored[1].ttft_s == pytest.approx((9 + 40 * 0.3) / 1e6)
    # kv counts the store's blocks for every worker: the same reuse, from the device where it can
    kv = simulate("kv", prompts, 2, 20, BS, 1e6, store_blocks=64)
    assert [r.actual for r in kv] == [0, 40, 48, 56]
    # a 4-block store keeps the last 4 blocks put (turn 1's blocks 6-9), not the head of the history:
    # turn 2 on the empty prefill-1 finds nothing
    small = simulate("round-robin", prompts, 2, 20, BS, 1e6, store_blocks=4)
    assert small[1].actual == 0 and small[1].ideal == 40
