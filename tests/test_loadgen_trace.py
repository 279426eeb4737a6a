"""Mooncake trace parsing, replay as token ids (shared hash-id prefixes -> shared token prefixes) and the
best possible prefix-cache hit ratio, on hand-made traces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from k2serve.loadgen.trace import (
    TraceEntry,
    TraceFormatError,
    TraceScaling,
    best_cached_tokens,
    best_hit_ratio,
    block_token_ids,
    cacheable_blocks,
    ideal_cache_hits,
    parse_trace,
    read_trace,
    sample_conversations,
    trace_requests,
)


def line(ts: float, n_in: int, n_out: int, ids: list[int]) -> str:
    return json.dumps({"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": ids})


# block size 4: ceil(n_in / 4) hash ids each
HAND = [
    line(0, 10, 3, [1, 2, 3]),  # blocks 4 4 2: nothing seen
    line(100, 12, 2, [1, 2, 4]),  # 1, 2 seen (8 tokens)
    line(250, 6, 1, [1, 5]),  # 1 seen (4)
    line(250, 9, 4, [1, 2, 3]),  # 1, 2 full, 3 seen as 2 tokens, now 1 token: min = 1 -> 9
]


def test_parse_reads_every_field_and_skips_blank_lines() -> None:
    entries = parse_trace(["", HAND[0], "  ", HAND[1]], block_size=4)
    assert entries == [TraceEntry(0.0, 10, 3, (1, 2, 3)), TraceEntry(100.0, 12, 2, (1, 2, 4))]
    assert len(parse_trace(HAND, block_size=4, limit=2)) == 2


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"timestamp": 1, "input_length": 4, "output_length": 1}', "hash_ids must be a list"),
        (line(0, 0, 1, []), "input_length must be an integer >= 1"),
        (line(0, 4, 0, [1]), "output_length must be an integer >= 1"),
        (line(-5, 4, 1, [1]), "timestamp must be a number"),
        (line(0, 4, 1, [1, 2]), "2 hash_ids for input_length 4"),
        (line(0, 4, 1, [-1]), "hash_ids must be a list of integers"),
        ('{"timestamp": 0, "input_length": 4.5, "output_length": 1, "hash_ids": [1, 2]}', "input_length"),
        (line(50, 4, 1, [7]), "before the previous line"),  # after HAND[1] at 100 ms
    ],
)
def test_bad_line_names_its_line_number(bad: str, reason: str) -> None:
    with pytest.raises(TraceFormatError) as info:
        parse_trace([HAND[0], "", HAND[1], bad], source="t.jsonl", block_size=4)
    assert info.value.line_no == 4 and info.value.line == bad.strip()
    assert str(info.value).startswith("t.jsonl:4: ") and reason in str(info.value)


def test_read_trace_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(HAND[0] + "\n" + "oops\n")
    with pytest.raises(TraceFormatError, match=rf"{path}:2: not JSON"):
        read_trace(path, block_size=4)


def test_best_hit_ratio_of_a_hand_made_trace() -> None:
    entries = parse_trace(HAND, block_size=4)
    blocks = [[(1, 4), (2, 4), (3, 2)], [(1, 4), (2, 4), (4, 4)], [(1, 4), (5, 2)], [(1, 4), (2, 4), (3, 1)]]
    assert best_cached_tokens(blocks) == [0, 8, 4, 9]
    assert best_hit_ratio(entries, block_size=4) == pytest.approx(21 / 37)
    # a later, longer cut of a block only hits what the earlier, shorter cut held
    assert best_cached_tokens([[(9, 2)], [(9, 4)], [(9, 4)]]) == [0, 2, 4]


def test_shared_hash_prefixes_give_shared_token_prefixes() -> None:
    entries = parse_trace(HAND, block_size=4)
    reqs = list(trace_requests(entries, TraceScaling(block_size=4, vocab_size=50), seed=3))
    a, b, c, d = (r.prompt for r in reqs)
    assert [len(p) for p in (a, b, c, d)] == [10, 12, 6, 9]
    assert a[:8] == b[:8] and a[8:10] != b[8:10]  # blocks 1, 2 shared; 3 vs 4 differ
    assert a[:4] == c[:4] and a[4:6] != c[4:6]
    assert d == a[:9]  # same hash ids, the last block cut shorter
    assert all(0 <= t < 50 for p in (a, b, c, d) for t in p)
    assert [r.best_cached_tokens for r in reqs] == [0, 8, 4, 9]
    assert [r.output_len for r in reqs] == [3, 2, 1, 4]
    assert [r.arrival_s for r in reqs] == [0.0, 0.1, 0.25, 0.25]
    # another seed gives other tokens; the same seed the same ones
    again = [r.prompt for r in trace_requests(entries, TraceScaling(block_size=4, vocab_size=50), seed=3)]
    other = [r.prompt for r in trace_requests(entries, TraceScaling(block_size=4, vocab_size=50), seed=4)]
    assert again == [a, b, c, d] and other[0] != a


def test_block_tokens_are_a_function_of_seed_and_hash_id() -> None:
    long = block_token_ids(0, [5, 6], [8, 8], 1000)
    short = block_token_ids(0, [6], [3], 1000)
    assert list(short) == list(long[8:11])  # a block's tokens do not depend on its position in the prompt
    assert list(block_token_ids(0, [5], [8], 1000)) != list(block_token_ids(1, [5], [8], 1000))


def test_length_and_time_scaling() -> None:
    entry = TraceEntry(2000.0, 1100, 300, (1, 2, 3))  # blocks 512 512 76
    s = TraceScaling(time_scale=0.5, length_scale=1 / 64)  # blocks of 8 tokens
    assert s.scaled_block_size == 8
    assert s.scaled_blocks(entry) == [(1, 8), (2, 8), (3, 1)]  # 76/64 -> 1
    assert s.output_len(entry) == 5  # 300/64 = 4.7
    assert TraceScaling(length_scale=1e-4).scaled_blocks(entry) == [(1, 1), (2, 1), (3, 1)]  # at least 1
    first = TraceEntry(1000.0, 8, 1, (9,))
    reqs = list(trace_requests([first, entry], s, seed=0))
    assert [r.arrival_s for r in reqs] == [0.0, 0.5]  # (2000 - 1000) ms * 0.5
    assert len(reqs[1].prompt) == 17
    with pytest.raises(ValueError, match="length_scale"):
        TraceScaling(length_scale=0.0)


def test_the_shared_conversation_trace_has_its_documented_best_hit_ratio() -> None:
    path = Path(__file__).resolve().parents[2] / "shared" / "traces" / "conversation_trace.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent: the Mooncake traces live only in the k2serve workspace")
    entries = read_trace(path)
    assert len(entries) == 12031
    # SOURCE.md: 36.6% of blocks; in tokens (partial last blocks rarely hit) a little more
    assert best_hit_ratio(entries) == pytest.approx(0.3736, abs=1e-4)


def test_cacheable_blocks_are_full_blocks_before_the_last_token() -> None:
    assert cacheable_blocks([(1, 4), (2, 4), (3, 2)], 4) == [1, 2]
    # 8 tokens: the last token is always computed, so only (8 - 1) // 4 = 1 block can be served
    assert cacheable_blocks([(1, 4), (2, 4)], 4) == [1]
    assert cacheable_blocks([(1, 3)], 4) == []
    assert cacheable_blocks([(1, 4), (2, 3), (3, 4), (4, 1)], 4) == [1]  # nothing after a partial block


def test_ideal_cache_unbounded_counts_leading_seen_blocks() -> None:
    prompts = [
        [(1, 4), (2, 4), (3, 2)],  # nothing seen; caches 1, 2
        [(1, 4), (2, 4), (4, 4), (5, 1)],  # 1, 2 hit (8); caches 1, 2, 4
        [(1, 4), (9, 4), (4, 4), (6, 4), (7, 1)],  # 1 hits; 9 misses, so 4 after it does not count
        [(7, 4), (1, 4), (8, 1)],  # 7 was only a partial block: never cached
    ]
    assert ideal_cache_hits(prompts, 4, None) == [0, 8, 4, 0]


def test_ideal_cache_evicts_least_recently_used_tail_first() -> None:
    a = [(1, 4), (2, 4), (3, 4), (0, 1)]  # 3 cacheable blocks
    b = [(5, 4), (6, 4), (0, 1)]  # 2
    # capacity 4: after b, the oldest of a's blocks goes: its tail (3) first, since 1 was touched last
    assert ideal_cache_hits([a, b, a], 4, 4) == [0, 0, 8]
    assert ideal_cache_hits([a, b, a], 4, 5) == [0, 0, 12]
    assert ideal_cache_hits([a, b, a], 4, 0) == [0, 0, 0]
    # after a, b, a, c the cache is [3, 2, 1, 7] (LRU first); b misses and, stored, pushes out 3 and 2
    c = [(7, 4), (0, 1)]
    assert ideal_cache_hits([a, b, a, c, b, a], 4, 4) == [0, 0, 8, 0, 0, 4]
    with pytest.raises(ValueError, match="capacity_blocks"):
        ideal_cache_hits([a], 4, -1)


def test_ideal_cache_is_never_above_unbounded_and_grows_with_capacity() -> None:
    entries = parse_trace(HAND, block_size=4) * 3
    blocks = [TraceScaling(block_size=4).scaled_blocks(e) for e in entries]
    totals = [sum(ideal_cache_hits(blocks, 4, cap)) for cap in (0, 1, 2, 3, 5, 8, None)]
    assert totals == sorted(totals) and totals[0] == 0 and totals[-1] > 0


def test_sample_conversations_keeps_whole_conversations_in_order() -> None:
    entries = [
        TraceEntry(float(t), 8, 1, (0, conv, 100 + t))
        for t, conv in enumerate([1, 2, 1, 3, 2, 1, 2, 4, 4, 4, 5])
    ]  # conversation 1: 3 requests, 2: 3, 4: 3, 3 and 5: one each
    picked = sample_conversations(entries, 2, seed=0, group_blocks=2, min_requests=3)
    convs = {e.hash_ids[1] for e in picked}
    assert len(convs) == 2 and convs <= {1, 2, 4}
    assert picked == [e for e in entries if e.hash_ids[1] in convs]  # every request of each, in order
    assert sample_conversations(entries, 2, seed=0) == picked  # seeded
    assert {e.hash_ids[1] for e in sample_conversations(entries, 3, seed=5)} == {1, 2, 4}
    with pytest.raises(ValueError, match="3 conversations of >= 3 requests"):
        sample_conversations(entries, 4, seed=0)
    # a conversation with one request that does not fit is left out whole
    too_long = {entries[6].timestamp_ms}  # a request of conversation 2
    kept = sample_conversations(entries, 2, seed=0, fits=lambda e: e.timestamp_ms not in too_long)
    assert {e.hash_ids[1] for e in kept} == {1, 4}
    with pytest.raises(ValueError, match="2 conversations of >= 3 requests that fit"):
        sample_conversations(entries, 3, seed=0, fits=lambda e: e.timestamp_ms not in too_long)
