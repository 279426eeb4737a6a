"""Mooncake traces: parsing, replay as token-id requests, and the best possible prefix-cache hit ratio.

A trace line is `{"timestamp": ms, "input_length": tokens, "output_length": tokens, "hash_ids": [...]}`
where hash_ids are prefix-chained ids of the prompt's blocks of `block_size` (512) tokens. A replayed
prompt concatenates, per hash id, a deterministic pseudo-random block of token ids derived from
(seed, hash_id), so requests that share a hash-id prefix share a token prefix and a server's prefix
cache really hits; the last block is cut to the input length.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from k2serve.loadgen.dataset import BenchRequest

MOONCAKE_BLOCK_SIZE = 512


@dataclass(frozen=True)
class TraceEntry:
    """One trace line: arrival (ms from the trace start), lengths (tokens) and prompt block ids."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


class TraceFormatError(ValueError):
    """A trace line that is not a valid entry; `source`, `line_no` (1-based) and `line` name it."""

    def __init__(self, source: str, line_no: int, line: str, reason: str) -> None:
        shown = line if len(line) <= 200 else line[:200] + "..."
        super().__init__(f"{source}:{line_no}: {reason}: {shown!r}")
        self.source = source
        self.line_no = line_no
        self.line = line
        self.reason = reason


def _int_field(obj: dict, name: str, minimum: int) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_entry(line: str, block_size: int = MOONCAKE_BLOCK_SIZE) -> TraceEntry:
    """One line; ValueError says what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object but {type(obj).__name__}")
    ts = obj.get("timestamp")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts) or ts < 0:
        raise ValueError(f"timestamp must be a number of ms >= 0, got {ts!r}")
    n_in = _int_field(obj, "input_length", 1)
    n_out = _int_field(obj, "output_length", 1)
    ids = obj.get("hash_ids")
    if not isinstance(ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) and 0 <= h < 2**63 for h in ids
    ):
        raise ValueError(f"hash_ids must be a list of integers in [0, 2**63), got {ids!r}")
    if len(ids) != math.ceil(n_in / block_size):
        raise ValueError(
            f"{len(ids)} hash_ids for input_length {n_in}: expected ceil({n_in}/{block_size}) = "
            f"{math.ceil(n_in / block_size)} (is --block-size right?)"
        )
    return TraceEntry(float(ts), n_in, n_out, tuple(ids))


def parse_trace(
    lines: Iterable[str],
    source: str = "<trace>",
    block_size: int = MOONCAKE_BLOCK_SIZE,
    limit: int | None = None,
) -> list[TraceEntry]:
    """The entries of the first `limit` non-blank lines (all when None), in file order. A bad line raises
    TraceFormatError naming its line number; timestamps must not decrease."""
    out: list[TraceEntry] = []
    for line_no, raw in enumerate(lines, start=1):
        if limit is not None and len(out) >= limit:
            break
        line = raw.strip()
        if not line:
            continue
        try:
            entry = parse_entry(line, block_size)
        except ValueError as e:
            raise TraceFormatError(source, line_no, line, str(e)) from e
        if out and entry.timestamp_ms < out[-1].timestamp_ms:
            raise TraceFormatError(
                source, line_no, line, f"timestamp {entry.timestamp_ms} ms is before the previous line's"
            )
        out.append(entry)
    return out


def read_trace(
    path: str | Path, block_size: int = MOONCAKE_BLOCK_SIZE, limit: int | None = None
) -> list[TraceEntry]:
    with open(path, encoding="utf-8") as f:
        return parse_trace(f, str(path), block_size, limit)


def best_cached_tokens(prompts: Iterable[Sequence[tuple[int, int]]]) -> list[int]:
    """Per prompt (given as its blocks `(hash_id, tokens)` in order, in arrival order), the prompt tokens an
    infinite prefix cache would hold: for each block whose hash id was seen before, the tokens it shares
    with the longest earlier block of that id (blocks of one id are cuts of the same token block)."""
    seen: dict[int, int] = {}
    out = []
    for blocks in prompts:
        hit = 0
        for hash_id, n in blocks:
            hit += min(n, seen.get(hash_id, 0))
        for hash_id, n in blocks:
            seen[hash_id] = max(n, seen.get(hash_id, 0))
        out.append(hit)
    return out


def entry_blocks(entry: TraceEntry, block_size: int) -> list[tuple[int, int]]:
    """The entry's blocks `(hash_id, tokens)` at its own (unscaled) block size."""
    last = entry.input_length - block_size * (len(entry.hash_ids) - 1)
    return [(h, block_size if i < len(entry.hash_ids) - 1 else last) for i, h in enumerate(entry.hash_ids)]


def best_hit_ratio(entries: Sequence[TraceEntry], block_size: int = MOONCAKE_BLOCK_SIZE) -> float:
    """The trace's best possible prefix-cache hit ratio (cached / prompt tokens, infinite cache)."""
    total = sum(e.input_length for e in entries)
    hits = sum(best_cached_tokens(entry_blocks(e, block_size) for e in entries))
    return hits / total if total else 0.0


@dataclass(frozen=True)
class TraceScaling:
    """How a trace is fitted to a run.

    time_scale: arrival offsets are timestamp * time_scale (0.1 replays 10x faster). length_scale:
    input/output lengths (and the block size) are multiplied by it, at least 1 token each.
    block_size: the trace's hash block (tokens, 512 for Mooncake). vocab_size: prompt ids in [0, it).
    """

    time_scale: float = 1.0
    length_scale: float = 1.0
    block_size: int = MOONCAKE_BLOCK_SIZE
    vocab_size: int = 1024

    def __post_init__(self) -> None:
        for name in ("time_scale", "length_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v}")
        if self.block_size < 1 or self.vocab_size < 1:
            raise ValueError(
                f"block_size and vocab_size must be >= 1, got {self.block_size}, {self.vocab_size}"
            )

    @property
    def scaled_block_size(self) -> int:
        return max(1, round(self.block_size * self.length_scale))

    def scaled_blocks(self, entry: TraceEntry) -> list[tuple[int, int]]:
        """The replayed prompt's blocks `(hash_id, tokens)`: full blocks of the scaled size, the last
        one the scaled remainder (1..scaled block size)."""
        b = self.scaled_block_size
        blocks = entry_blocks(entry, self.block_size)
        last = min(b, max(1, round(blocks[-1][1] * self.length_scale)))
        return [(h, b) for h, _ in blocks[:-1]] + [(blocks[-1][0], last)]

    def output_len(self, entry: TraceEntry) -> int:
        return max(1, round(entry.output_length * self.length_scale))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def block_token_ids(
    seed: int, hash_ids: Sequence[int], lengths: Sequence[int], vocab_size: int
) -> np.ndarray:
    """The concatenated token blocks of `hash_ids`, block i cut to `lengths[i]` ids in [0, vocab_size).
    Token j of a block is a pure function of (seed, hash_id, j), so blocks of one id share a prefix."""
    ids = np.repeat(np.asarray(hash_ids, dtype=np.uint64), lengths)  # [T]
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = (np.arange(len(ids)) - starts).astype(np.uint64)  # [T] position inside its block
    key = _mix64(np.full(len(ids), seed & (2**64 - 1), dtype=np.uint64) ^ np.uint64(0x9E3779B97F4A7C15))
    x = _mix64(_mix64(key ^ ids) + pos)
    return (x % np.uint64(vocab_size)).astype(np.int64)


def trace_requests(entries: Sequence[TraceEntry], scaling: TraceScaling, seed: int) -> Iterator[BenchRequest]:
    """The entries as requests (prompts built lazily, one at a time), with arrivals relative to the first
    entry and their best cached tokens."""
    blocks = [scaling.scaled_blocks(e) for e in entries]
    best = best_cached_tokens(blocks)
    t0 = entries[0].timestamp_ms if entries else 0.0
    for i, (entry, bl) in enumerate(zip(entries, blocks, strict=True)):
        ids = block_token_ids(seed, [h for h, _ in bl], [n for _, n in bl], scaling.vocab_size)
        arrival = (entry.timestamp_ms - t0) / 1000.0 * scaling.time_scale
        yield BenchRequest(i, tuple(ids.tolist()), scaling.output_len(entry), arrival, best[i])


def cacheable_blocks(blocks: Sequence[tuple[int, int]], block_size: int) -> list[int]:
    """The hash ids of a prompt's blocks (`(hash_id, tokens)`, scaled) that a server's prefix cache can
    serve: full blocks only, and at most (prompt tokens - 1) // block_size of them, because the last
    prompt token is always computed (as k2serve's BlockManager.allocate does)."""
    n = sum(tokens for _, tokens in blocks)
    out = []
    for hash_id, tokens in blocks[: max(0, (n - 1) // block_size)]:
        if tokens != block_size:
            break
        out.append(hash_id)
    return out


def ideal_cache_hits(
    prompts: Iterable[Sequence[tuple[int, int]]], block_size: int, capacity_blocks: int | None
) -> list[int]:
    """Per prompt (its scaled blocks `(hash_id, tokens)`, in arrival order), the prefix-hit tokens of one
    ideal cache shared by every worker, holding `capacity_blocks` blocks (None: unbounded).

    The best a cluster whose prefill workers hold that many blocks together could do without sharing
    blocks between workers: a hit is a leading run of cacheable blocks (`cacheable_blocks`) present
    in the cache; after each prompt all its cacheable blocks are in the cache, most recently used, its
    first block most recent of all (a prefix cache frees a sequence's blocks tail first); when over
    capacity the least recently used blocks go. Arrivals only: requests do not overlap in time, so no
    block is pinned by a running request."""
    if capacity_blocks is not None and capacity_blocks < 0:
        raise ValueError(f"capacity_blocks must be >= 0 or None, got {capacity_blocks}")
    lru: OrderedDict[int, None] = OrderedDict()  # least recently used first
    out = []
    for blocks in prompts:
        ids = cacheable_blocks(blocks, block_size)
        hit = 0
        for h in ids:
            if h not in lru:
                break
            hit += 1
        out.append(hit * block_size)
        for h in reversed(ids):
            lru[h] = None
            lru.move_to_end(h)
        while capacity_blocks is not None and len(lru) > capacity_blocks:
            lru.popitem(last=False)
    return out


def sample_conversations(
    entries: Sequence[TraceEntry],
    conversations: int,
    seed: int,
    group_blocks: int = 2,
    min_requests: int = 3,
    fits: Callable[[TraceEntry], bool] | None = None,
) -> list[TraceEntry]:
    """The requests of `conversations` conversations of the trace, in trace order with their own
    timestamps: a smaller replay that keeps the trace's reuse between a conversation's turns.

    A conversation is the requests sharing their first `group_blocks` hash ids (in the Mooncake
    conversation trace every prompt starts with block 0, a shared system prompt, so the second block
    tells conversations apart); only those with at least `min_requests` requests, all of which `fits`
    (when given: e.g. a replayed request must fit a worker's KV pool), are drawn, uniformly with
    `seed`. ValueError when fewer than `conversations` qualify."""
    if conversations < 1 or group_blocks < 1 or min_requests < 1:
        raise ValueError(
            f"conversations, group_blocks and min_requests must be >= 1, got {conversations}, "
            f"{group_blocks}, {min_requests}"
        )
    groups: dict[tuple[int, ...], int] = {}
    unfit: set[tuple[int, ...]] = set()
    for e in entries:
        key = e.hash_ids[:group_blocks]
        groups[key] = groups.get(key, 0) + 1
        if fits is not None and not fits(e):
            unfit.add(key)
    eligible = sorted(
        k for k, n in groups.items() if n >= min_requests and len(k) == group_blocks and k not in unfit
    )
    if len(eligible) < conversations:
        raise ValueError(
            f"the trace has {len(eligible)} conversations of >= {min_requests} requests{' that fit' if fits else ''} "
            f"(by their first {group_blocks} hash ids), fewer than the {conversations} asked for"
        )
    rng = np.random.default_rng([seed, 3])
    picked = {eligible[i] for i in rng.choice(len(eligible), size=conversations, replace=False)}
    return [e for e in entries if e.hash_ids[:group_blocks] in picked]
