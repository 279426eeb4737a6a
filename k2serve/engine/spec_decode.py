"""Model-free draft proposals for speculative decoding (the verification is in llm_engine / sampler).

`ngram_propose` is prompt lookup, vLLM's NgramProposer: the drafts are the tokens that followed an
earlier occurrence of the sequence's own suffix. Method "suffix" is suffix decoding (Arctic Inference,
vLLM's SuffixDecodingProposer): suffix trees with occurrence counts, one per request over its prompt
and output and one over the outputs of recent requests; a draft follows the most frequent
continuation of the longest matching suffixes, as long as the match earns and the counts support
(`SuffixTree`, `speculate`, `SuffixCache`). `Proposer` is what the engine calls: the configured
method, plus a per-sequence backoff that stops drafting for a sequence whose drafts keep failing.
No model; the only state is the trees and the backoff counters.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import takewhile
from statistics import median_low

from k2serve.engine.config import SpeculativeConfig


def longest_match(
    haystack: Sequence[int], tokens: Sequence[int], max_n: int, last_end: int
) -> tuple[int, int]:
    """(n, end): the longest n <= max_n such that haystack[end - n + 1 .. end] equals the last n of
    `tokens`, over ends 0..last_end; the earliest end among equally long matches; (0, -1) if none.
    The candidate ends (where `tokens`' last token occurs) are found with list.index, a C-speed scan:
    only they cost Python steps (a 1,500-token agent prompt has a few dozen of any one token)."""
    total = len(tokens)
    last = tokens[-1]
    find = haystack.index if isinstance(haystack, list) else list(haystack).index
    best_len, best_end = 0, -1
    end = -1
    while True:
        try:
            end = find(last, end + 1, last_end + 1)
        except ValueError:
            break
        n = 1
        while n < max_n and n <= end and n < total and haystack[end - n] == tokens[total - 1 - n]:
            n += 1
        if n > best_len:
            best_len, best_end = n, end
            if n == max_n:
                break
    return best_len, best_end


def ngram_match(tokens: Sequence[int], k: int, max_n: int, min_n: int) -> tuple[int, list[int]]:
    """(n, drafts): `ngram_propose`'s drafts and the length n of the n-gram they follow ((0, []) when
    nothing matches)."""
    if k < 1 or len(tokens) < min_n or len(tokens) < 2:
        return 0, []
    n, end = longest_match(tokens, tokens, max_n, len(tokens) - 2)
    return (n, list(tokens[end + 1 : end + 1 + k])) if n >= min_n else (0, [])


def ngram_propose(tokens: Sequence[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Up to `k` draft tokens for the sequence `tokens` (prompt + output so far).

    The match is the longest n-gram, min_n <= n <= max_n, that ends the sequence and also occurs
    earlier in it (ending before the last token; overlaps allowed); among equally long matches the
    earliest occurrence wins (vLLM's KMP search picks the same one). The drafts are the tokens right
    after that occurrence, at most k and no further than the sequence goes. [] when nothing matches.
    """
    return ngram_match(tokens, k, max_n, min_n)[1]


class SuffixTree:
    """A suffix trie over a set of token sequences, cut at depth `max_depth`, with occurrence counts.

    The node of a string w (|w| <= max_depth) exists iff w occurs in a stored sequence, and its
    `count` is the number of occurrences of w over all stored sequences (overlaps included). The
    root's count is the number of stored tokens. Sequences grow one token at a time (`append`: the
    suffixes of lengths 1..max_depth that end at the new token each extend by one node, O(max_depth))
    and are removed whole (`remove`: every occurrence they contributed is subtracted and nodes that
    reach count 0 are deleted, so the trie holds exactly what the remaining sequences make).

    This is Arctic Inference's suffix tree (vLLM's method "suffix") without path compression: the
    counts at the node boundaries a compressed tree has are the same, so the drafts are the same.

    Layout: a node is an int id (`ROOT` is 0); `counts[id]` is its count and `kids[id]` its children
    as a dict {token: child id}. Only ints are stored, so a node costs no Python object of its own and
    nothing here is tracked by the cyclic garbage collector (a dict of ints is not): an object per
    node (the first layout) made a prompt's ~250 x depth new nodes trigger collections that walked
    every node of every tree, most of the bookkeeping's time in a serving process. Deleted ids are
    reused (`_free`), so a long-lived tree's arrays stay as large as its most nodes at once.
    """

    ROOT = 0

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.counts: list[int] = [0]
        self.kids: list[dict[int, int]] = [{}]
        self._free: list[int] = []
        self.num_nodes = 0  # nodes besides the root (memory accounting, tests)
        self._seqs: dict[Hashable, list[int]] = {}
        # per sequence: the nodes of its suffixes ending at its last token, by length (index L - 1)
        self._tails: dict[Hashable, list[int]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._seqs

    def __len__(self) -> int:
        """Number of stored sequences."""
        return len(self._seqs)

    def length(self, key: Hashable) -> int:
        """Tokens stored for sequence `key` (0 if absent)."""
        seq = self._seqs.get(key)
        return 0 if seq is None else len(seq)

    def tokens(self, key: Hashable) -> list[int]:
        """The tokens stored for sequence `key` ([] if absent; do not modify)."""
        return self._seqs.get(key, [])

    def tail(self, key: Hashable) -> list[int]:
        """The nodes of sequence `key`'s suffixes of lengths 1..min(len, max_depth), shortest first."""
        return self._tails.get(key, [])

    def extend(self, key: Hashable, tokens: Iterable[int]) -> None:
        """Append each token of `tokens` to sequence `key` (created when new): each token extends the
        suffixes of lengths 1..max_depth that end at it by one node, O(max_depth) node visits."""
        seq = self._seqs.setdefault(key, [])
        tail = self._tails.get(key, [])
        counts, kids, free = self.counts, self.kids, self._free
        keep = self.max_depth - 1
        created = 0
        for token in tokens:  # the hot loop of the trees: plain locals, no calls but list ops
            seq.append(token)
            new = []
            for node in (0, *tail[:keep]):
                children = kids[node]
                child = children.get(token)
                if child is None:
                    if free:
                        child = free.pop()
                    else:
                        child = len(counts)
                        counts.append(0)
                        kids.append({})
                    children[token] = child
                    created += 1
                counts[child] += 1
                new.append(child)
            tail = new
            counts[0] += 1
        self._tails[key] = tail
        self.num_nodes += created

    def append(self, key: Hashable, token: int) -> None:
        """Append one token to sequence `key` (see `extend`)."""
        self.extend(key, (token,))

    def remove(self, key: Hashable) -> None:
        """Forget sequence `key` (no-op if absent): O(len x max_depth)."""
        seq = self._seqs.pop(key, None)
        self._tails.pop(key, None)
        if seq is None:
            return
        counts, kids = self.counts, self.kids
        counts[0] -= len(seq)
        for start in range(len(seq)):
            node = 0
            for tok in seq[start : start + self.max_depth]:
                child = kids[node][tok]
                counts[child] -= 1
                if counts[child] == 0:  # its descendants on this path held only this occurrence too
                    del kids[node][tok]
                    self._release(child)
                    break
                node = child

    def _release(self, node: int) -> None:
        """Free the subtree rooted at `node` (its ids go to the free list, its counts to 0)."""
        stack = [node]
        while stack:
            n = stack.pop()
            stack.extend(self.kids[n].values())
            self.kids[n].clear()
            self.counts[n] = 0
            self._free.append(n)
            self.num_nodes -= 1

    def truncate(self, key: Hashable, n: int) -> None:
        """Keep only the first `n` tokens of sequence `key`: each dropped token takes its occurrence
        out of the nodes of the suffixes that end at it (O(max_depth^2) per dropped token)."""
        seq = self._seqs.get(key)
        if seq is None or n >= len(seq):
            return
        tail = self._tails[key]
        counts, kids = self.counts, self.kids
        while len(seq) > max(n, 0):
            token = seq.pop()
            new_tail = [
                self.find(seq[len(seq) - size :]) for size in range(1, min(len(seq), self.max_depth) + 1)
            ]
            for parent, node in zip([0, *new_tail], tail, strict=False):
                counts[node] -= 1
                if counts[node] == 0:  # its only occurrence ended at the dropped token: a leaf
                    del kids[parent][token]  # type: ignore[index]
                    self._release(node)
            counts[0] -= 1
            tail = [node for node in new_tail if node is not None]  # all exist: seq holds them
        self._tails[key] = tail

    def find(self, pattern: Sequence[int]) -> int | None:
        """The node of `pattern` (None if it does not occur or is longer than max_depth)."""
        if len(pattern) > self.max_depth:
            return None
        node: int | None = 0
        kids = self.kids
        for tok in pattern:
            node = kids[node].get(tok)  # type: ignore[index]
            if node is None:
                return None
        return node

    def matches(self, context: Sequence[int]) -> Iterator[tuple[int, int]]:
        """(L, node of context[-L:]) for L = 1, 2, ... while that suffix of `context` occurs."""
        for length in range(1, min(len(context), self.max_depth) + 1):
            node = self.find(context[len(context) - length :])
            if node is None:
                return
            yield length, node

    def draft_from(self, node: int, max_tokens: int, min_token_prob: float) -> tuple[list[int], float]:
        """Greedy path from `node`: the most frequent child each step (ties: the smaller token id), its
        estimated probability the product of child count / parent count along the path; stops before
        a token whose probability falls below `min_token_prob`, at a leaf, or at `max_tokens` tokens.
        Returns (tokens, sum of their probabilities)."""
        counts, kids = self.counts, self.kids
        tokens: list[int] = []
        prob, score = 1.0, 0.0
        while len(tokens) < max_tokens:
            children = kids[node]
            if not children:
                break
            if len(children) == 1:
                ((tok, child),) = children.items()
            else:  # most frequent, then the smaller token id
                tok, child = min(children.items(), key=lambda item: (-counts[item[1]], item[0]))
            prob *= counts[child] / counts[node]
            if prob < min_token_prob:
                break
            tokens.append(tok)
            score += prob
            node = child
        return tokens, score


@dataclass(frozen=True)
class Draft:
    """A speculation: the draft tokens, their score (the sum of each token's estimated probability,
    the expected number accepted) and the suffix match length it extends."""

    tokens: tuple[int, ...] = ()
    score: float = 0.0
    match_len: int = 0


def speculate(
    tree: SuffixTree,
    matches: Iterable[tuple[int, int]],
    limit: int,
    max_spec_factor: float,
    min_token_prob: float,
) -> Draft:
    """The best draft over the suffix matches (L, node) of `tree`: from each, `draft_from` with at most
    min(limit, floor(max_spec_factor x L)) tokens (a longer match earns a longer draft); the highest
    score wins, the longer match on a tie (Arctic's rule)."""
    best = Draft()
    for length, node in matches:
        cap = min(limit, int(max_spec_factor * length + 1e-6))
        tokens, score = tree.draft_from(node, cap, min_token_prob)
        if score >= best.score:
            best = Draft(tuple(tokens), score, length)
    return best


class SuffixCache:
    """Method "suffix" state of one engine: a `SuffixTree` per live request over its prompt + output,
    and a global one over the outputs of the last `suffix_decoding_max_cached_requests` requests
    (live ones included, as they are generated; the oldest request is evicted first; 0: no global
    tree). Trees catch up with a sequence's new tokens when it next asks for drafts (O(depth) per
    token); a request's own tree is parked when it finishes, and a later request whose prompt starts
    with most of it adopts it (cut back to the common prefix) instead of building its prompt's tree
    anew: an agent loop's next turn repeats the previous turn's prompt."""

    PARKED = 4  # finished requests' own trees kept for a later prompt that starts the same way

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.depth = config.suffix_decoding_max_tree_depth
        self.global_tree = SuffixTree(self.depth)
        self.local: dict[str, SuffixTree] = {}
        self._parked: OrderedDict[int, SuffixTree] = OrderedDict()  # oldest first
        self.num_reused = 0  # own trees adopted from a finished request (tests, bench)
        self._keys: dict[str, int] = {}  # live request id -> its key in the global tree
        self._cached: OrderedDict[int, None] = OrderedDict()  # global keys, oldest first
        self._next_key = 0

    def _sync(self, request_id: str, prompt: Sequence[int], output: Sequence[int]) -> SuffixTree:
        local = self.local.get(request_id)
        if local is None:
            local = self.local[request_id] = self._adopt(prompt) or SuffixTree(self.depth)
        n = local.length(0)
        if n < len(prompt):
            local.extend(0, prompt[n:])
            n = len(prompt)
        local.extend(0, output[n - len(prompt) :])
        self._sync_global(request_id, output)
        return local

    def _adopt(self, prompt: Sequence[int]) -> SuffixTree | None:
        """A parked tree whose sequence shares a long prefix with `prompt` (an agent loop's next turn
        starts with the previous turn's prompt), cut back to that prefix; None when cutting would cost
        more than building anew (dropped x depth / 2 > kept)."""
        best, best_len = None, 0
        for key, tree in self._parked.items():
            n = common_prefix_len(tree.tokens(0), prompt)
            if n > best_len:
                best, best_len = key, n
        if best is None:
            return None
        tree = self._parked[best]
        if (tree.length(0) - best_len) * self.depth > 2 * best_len:
            return None
        del self._parked[best]
        tree.truncate(0, best_len)
        self.num_reused += 1
        return tree

    def _sync_global(self, request_id: str, output: Sequence[int]) -> None:
        limit = self.config.suffix_decoding_max_cached_requests
        if limit < 1:
            return
        key = self._keys.get(request_id)
        if key is None:
            if not output:  # a slot only for a request with output
                return
            key = self._keys[request_id] = self._next_key
            self._next_key += 1
            self._cached[key] = None
            while len(self._cached) > limit:
                old, _ = self._cached.popitem(last=False)
                self.global_tree.remove(old)
        if key in self._cached:  # else evicted while still generating: no longer cached
            self.global_tree.extend(key, output[self.global_tree.length(key) :])

    def propose(self, request_id: str, prompt: Sequence[int], output: Sequence[int], limit: int) -> list[int]:
        """At most `limit` drafts after prompt + output: the better of the request's own tree's and the
        global tree's `speculate` (the request's own on a tie)."""
        c = self.config
        local = self._sync(request_id, prompt, output)
        factor, min_prob = c.suffix_decoding_max_spec_factor, c.suffix_decoding_min_token_prob
        # a suffix seen once is only the current occurrence (no continuation), nor is any longer one
        counts = local.counts
        own = takewhile(lambda match: counts[match[1]] > 1, enumerate(local.tail(0), 1))
        best = speculate(local, own, limit, factor, min_prob)
        if len(self.global_tree):
            context = (list(prompt[-self.depth :]) + list(output))[-self.depth :]
            other = speculate(self.global_tree, self.global_tree.matches(context), limit, factor, min_prob)
            if other.score > best.score:
                best = other
        return list(best.tokens)

    def finish(self, request_id: str, output: Sequence[int]) -> None:
        """The request ended: its whole output stays in the global tree, its own tree goes."""
        if output:
            self._sync_global(request_id, output)
        local = self.local.pop(request_id, None)
        if local is not None and local.length(0):
            self._parked[self._next_key] = local  # any unique key: _next_key only grows
            self._next_key += 1
            while len(self._parked) > self.PARKED:
                self._parked.popitem(last=False)
        self._keys.pop(request_id, None)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of `a` and `b` (slice compares: binary search in C speed)."""
    lo, hi = 0, min(len(a), len(b))
    if list(a[:hi]) == list(b[:hi]):
        return hi
    while lo < hi:  # invariant: a[:lo] == b[:lo] and a[:hi + 1] != b[:hi + 1]
        mid = (lo + hi + 1) // 2
        if list(a[lo:mid]) == list(b[lo:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


class Proposer:
    """The drafts of one engine's speculative config, by request id.

    Backoff (the standard remedy for drafts that cost time when they fail): after `BACKOFF_AFTER`
    verifications in a row of one sequence that accepted no draft, that sequence skips drafting for
    1, 2, 4, .. (at most `BACKOFF_MAX`) decode steps, doubling with each further failure; one accepted
    draft resets it. Method "suffix" backs off later and less (`SUFFIX_BACKOFF_AFTER`,
    `SUFFIX_BACKOFF_MAX`): its drafts already pass a probability floor, a verifying row costs ~1.07x
    a plain step per draft token on CPU (not the 1.4x the first schedule assumed), and in an agent
    loop the steps the first schedule skipped were where copying resumed (demo model, agent loop,
    depth 24: 78 skipped steps, 1.43x modelled; after 3 misses, at most 4: 14 skipped, 1.53x;
    BENCHMARKS.md). Method "ngram" also raises the bar after a failure: a sequence whose drafts,
    following an n-gram match, were all rejected drafts again only from a match longer than n (at
    most prompt_lookup_max), until one of its drafts is accepted (then prompt_lookup_min again); so
    text without repetition stops paying for the 1-gram matches it keeps having; and an n-gram match
    drafts at most `NGRAM_DRAFTS_PER_MATCH_TOKEN` x n tokens (a short match's long draft mostly
    fails, each rejected token costing its verifying row ~7% of a plain step on CPU). These only decide
    whether to draft, never what the model outputs: the tokens are the same with or without them
    (tests)."""

    BACKOFF_AFTER = 1
    BACKOFF_MAX = 16
    NGRAM_DRAFTS_PER_MATCH_TOKEN = 2
    SUFFIX_BACKOFF_AFTER = 3
    SUFFIX_BACKOFF_MAX = 4

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.suffix = SuffixCache(config) if config.method == "suffix" else None
        suffix = self.suffix is not None
        self.backoff_after = self.SUFFIX_BACKOFF_AFTER if suffix else self.BACKOFF_AFTER
        self.backoff_max = self.SUFFIX_BACKOFF_MAX if suffix else self.BACKOFF_MAX
        self._misses: dict[str, int] = {}
        self._skip: dict[str, int] = {}
        self._match_len: dict[str, int] = {}  # ngram: the n-gram length of the last drafts
        self._min_len: dict[str, int] = {}  # ngram: the raised prompt_lookup_min after a failure
        self.num_skipped = 0  # decode steps the backoff left without drafts (tests, bench)
        self.num_raised = 0  # ngram proposals dropped because the match was not longer (tests, bench)

    def propose(self, request_id: str, prompt: Sequence[int], output: Sequence[int], limit: int) -> list[int]:
        """At most `limit` (and num_speculative_tokens) drafts after prompt + output."""
        c = self.config
        k = min(limit, c.num_speculative_tokens)
        if k < 1:
            return []
        skip = self._skip.get(request_id, 0)
        if skip:
            self._skip[request_id] = skip - 1
            self.num_skipped += 1
            return []
        if self.suffix is not None:
            return self.suffix.propose(request_id, prompt, output, k)
        n, drafts = ngram_match([*prompt, *output], k, c.prompt_lookup_max, c.prompt_lookup_min)
        if drafts and n < self._min_len.get(request_id, 0):
            self.num_raised += 1
            return []
        self._match_len[request_id] = n
        return drafts[: self.NGRAM_DRAFTS_PER_MATCH_TOKEN * n]

    def record(self, request_id: str, accepted: int) -> None:
        """A verification of `request_id`'s drafts accepted `accepted` of them (drives the backoff)."""
        if accepted:
            self._misses.pop(request_id, None)
            self._min_len.pop(request_id, None)
            return
        misses = self._misses[request_id] = self._misses.get(request_id, 0) + 1
        if misses >= self.backoff_after:
            self._skip[request_id] = min(2 ** (misses - self.backoff_after), self.backoff_max)
        if self.suffix is None:
            failed = self._match_len.get(request_id, 0)
            self._min_len[request_id] = min(failed + 1, self.config.prompt_lookup_max)

    def finish(self, request_id: str, output: Sequence[int]) -> None:
        """`request_id` finished or was aborted with `output`: drop its state (suffix: its output stays
        in the global tree)."""
        for state in (self._misses, self._skip, self._match_len, self._min_len):
            state.pop(request_id, None)
        if self.suffix is not None:
            self.suffix.finish(request_id, output)


class DraftBudget:
    """How many of a row's drafts a step verifies: the count that maximises the expected decode tokens
    per second, from what this engine measured. Verifying d drafts costs what a step of d more rows
    costs, and that depends on the engine: eager on the CPU ~7% of a plain step a draft, but a captured
    step's verifying rows fall into larger buckets (demo model, fp32: 0.95 ms a plain step, 1.25 ms with
    1 draft, 1.85 with 2-3, 5.5 with 4-5), where drafts accepted at suffix decoding's rate (0.42) cost
    more time than they save. So the engine keeps:

    - the decode-only step's time by the rows it ran (`observe_step`; per row count the lower median of
      the last `SAMPLES`: a step that compiled a bucket (~1.5 s) is not taken for its cost);
    - per draft position i, how often a draft was accepted given the ones before it were
      (`observe_verify`), as (accepted + 1) / (verified + 2);
    - what asking the proposer costs (`observe_propose`, the same lower median): part of the price of
      any drafts (suffix trees catching up, the search), ~0.1-0.2 ms a call on the demo agent loop,
      where a captured plain step takes 1.5 ms;

    and `budget(rows, d)`, asked before proposing (d: the drafts a row has room for), gives the j <= d
    that maximises (rows + E[accepted of the first j]) / (time(rows + j) + proposing) (j = 0: no drafts,
    and no proposing), `rows` the sequences decoding, a count past the largest timed one priced at
    that one's cost a draft (on the CPU eager step the cost is ~linear in the drafts; a captured step's
    next bucket costs more, which the exploring calls find), and the largest j within `NEAR` of the best
    (the position averages undervalue a confident proposal's later drafts: keeping only the best count
    measured 1.34-1.43x on the eager agent loop against 1.40-1.51x verifying all); drafts only where that
    beats no drafts by `MARGIN` (costs the step time leaves out: the scheduler's and the verifying
    rows' bookkeeping; on the captured demo step a predicted gain of ~0% measured 0.89x). Every
    `EXPLORE_EVERY`-th call (every `EXPLORE_UNTIMED`-th while rows + j + 1 is not timed yet) asks for one
    draft more than the estimate picks, so the estimates follow the workload without paying for the
    dearest counts again (a first version that verified all d drafts at those calls lost ~15% to them on
    the captured demo step, where 5 drafts cost 5x a plain step; one that asked for the smallest untimed
    count kept asking for drafts suffix decoding could not fill, so that count stayed untimed).
    Like the backoff, this only decides what is verified, never which tokens come out."""

    EXPLORE_EVERY = 32
    EXPLORE_UNTIMED = 4
    MARGIN = 0.1
    NEAR = 0.05
    SAMPLES = 8

    def __init__(self, num_speculative_tokens: int) -> None:
        self.verified = [0] * num_speculative_tokens
        self.accepted = [0] * num_speculative_tokens
        self._times: dict[int, deque[float]] = {}
        self._propose_s: deque[float] = deque(maxlen=self.SAMPLES)
        self.calls = 0
        self.num_trimmed = 0  # drafts a row had room for but the budget did not ask for (tests, bench)

    def observe_step(self, rows: int, seconds: float) -> None:
        """A decode-only step of `rows` rows (drafts included) took `seconds`."""
        if rows > 0 and seconds > 0:
            self._times.setdefault(rows, deque(maxlen=self.SAMPLES)).append(seconds)

    def observe_propose(self, seconds: float, tokens: int = 1) -> None:
        """Asking the proposer for one row's drafts took `seconds`, `tokens` tokens after the row's last
        proposal: the suffix trees catch up on every token since then, work a row proposing every step
        spreads over its steps, so the cost per step is seconds / tokens."""
        self._propose_s.append(seconds / max(tokens, 1))

    def step_time(self, rows: int) -> float | None:
        """The estimated time of a decode-only step of `rows` rows (None: not timed yet)."""
        times = self._times.get(rows)
        return median_low(times) if times else None

    def observe_verify(self, drafts: int, accepted: int) -> None:
        """A row verified `drafts` drafts and accepted the first `accepted`."""
        for i in range(min(drafts, accepted + 1, len(self.verified))):
            self.verified[i] += 1
            self.accepted[i] += i < accepted

    def accept_rate(self, i: int) -> float:
        """Estimated probability that draft i is accepted when drafts 0..i-1 were."""
        return (self.accepted[i] + 1) / (self.verified[i] + 2)

    def budget(self, rows: int, drafts: int) -> int:
        """How many drafts (at most `drafts`) a row should verify in a step of `rows` decoding sequences
        (the engine asks before proposing: 0 spares the proposer's work too)."""
        drafts = min(drafts, len(self.verified))
        if drafts <= 0:
            return 0
        self.calls += 1
        plain = self.step_time(rows)
        if plain is None:
            best = 0  # time the plain step first
        else:
            rates = {0: rows / plain * (1 + self.MARGIN)}  # drafts must beat no drafts by MARGIN
            propose = median_low(self._propose_s) if self._propose_s else 0.0
            expected, p, timed, last = 0.0, 1.0, 0, plain
            for j in range(1, drafts + 1):
                p *= self.accept_rate(j - 1)
                expected += p
                seconds = self.step_time(rows + j)
                if seconds is not None:
                    timed, last = j, seconds
                elif timed:  # past the counts timed: the last one's cost a draft, extrapolated
                    seconds = last + (j - timed) * max(last - plain, 0.0) / timed
                else:
                    break  # no draft count timed yet (an exploring call times one)
                rates[j] = (rows + expected) / (seconds + propose)
            top = max(rates.values())
            # the most drafts within NEAR of the best rate: where the estimate hardly tells counts apart
            # (eager, ~linear costs) the proposer's own confidence picks the length, not the averages
            best = 0 if rates[0] == top else max(j for j, r in rates.items() if r >= (1 - self.NEAR) * top)
            every = (
                self.EXPLORE_EVERY
                if best == drafts or self.step_time(rows + best + 1)
                else self.EXPLORE_UNTIMED
            )
            if self.calls % every == 0:
                best = min(best + 1, drafts)
        self.num_trimmed += drafts - best
        return best
