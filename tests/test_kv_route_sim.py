"""The routing replay of `k2serve.bench.kv_route_sim` (a diagnosis aid for KV-aware routing): its caches
behave as the ideal LRU, and the loss causes add up per request."""

from __future__ import annotations

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
