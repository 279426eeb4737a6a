"""Model-free draft proposals for speculative decoding (the verification is in llm_engine / sampler).

`ngram_propose` is prompt lookup, vLLM's NgramProposer: the drafts are the tokens that followed an
earlier occurrence of the sequence's own suffix. `Proposer` adds the "suffix" method's memory: the
same search also runs over recent requests' outputs. No model; the only state is that memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from k2serve.engine.config import SpeculativeConfig


def longest_match(
    haystack: Sequence[int], tokens: Sequence[int], max_n: int, last_end: int
) -> tuple[int, int]:
    """(n, end): the longest n <= max_n such that haystack[end - n + 1 .. end] equals the last n of
    `tokens`, over ends 0..last_end; the earliest end among equally long matches; (0, -1) if none."""
    total = len(tokens)
    last = tokens[-1]
    best_len, best_end = 0, -1
    for end in range(last_end + 1):
        if haystack[end] != last:
            continue
        n = 1
        while n < max_n and n <= end and n < total and haystack[end - n] == tokens[total - 1 - n]:
            n += 1
        if n > best_len:
            best_len, best_end = n, end
            if n == max_n:
                break
    return best_len, best_end


def ngram_propose(tokens: Sequence[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Up to `k` draft tokens for the sequence `tokens` (prompt + output so far).

    The match is the longest n-gram, min_n <= n <= max_n, that ends the sequence and also occurs
    earlier in it (ending before the last token; overlaps allowed); among equally long matches the
    earliest occurrence wins (vLLM's KMP search picks the same one). The drafts are the tokens right
    after that occurrence, at most k and no further than the sequence goes. [] when nothing matches.
    """
    if k < 1 or len(tokens) < min_n or len(tokens) < 2:
        return []
    n, end = longest_match(tokens, tokens, max_n, len(tokens) - 2)
    return list(tokens[end + 1 : end + 1 + k]) if n >= min_n else []


class Proposer:
    """The drafts of one engine's speculative config; for "suffix" it remembers the outputs of the
    last `suffix_decoding_max_cached_requests` finished requests (`remember`)."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.recent: deque[list[int]] = deque(maxlen=config.suffix_decoding_max_cached_requests)

    def remember(self, output_token_ids: Sequence[int]) -> None:
        """A finished request's output, searched by later "suffix" proposals (most recent first)."""
        if self.config.method == "suffix" and len(output_token_ids) > 1:
            self.recent.append(list(output_token_ids))

    def propose(self, tokens: Sequence[int], limit: int) -> list[int]:
        """At most `limit` (and num_speculative_tokens) drafts for the sequence `tokens`."""
        c = self.config
        k = min(limit, c.num_speculative_tokens)
        if k < 1 or len(tokens) < max(c.prompt_lookup_min, 1):
            return []
        best_len, best = 0, []
        if len(tokens) >= 2:
            n, end = longest_match(tokens, tokens, c.prompt_lookup_max, len(tokens) - 2)
            best_len, best = n, list(tokens[end + 1 : end + 1 + k])
        for out in reversed(self.recent):  # most recent first: wins ties
            if best_len == c.prompt_lookup_max:
                break
            n, end = longest_match(out, tokens, c.prompt_lookup_max, len(out) - 2)
            if n > best_len:
                best_len, best = n, out[end + 1 : end + 1 + k]
        return best if best_len >= c.prompt_lookup_min else []
