"""Model-free draft proposals for speculative decoding (the verification is in llm_engine / sampler).

`ngram_propose` is prompt lookup, vLLM's NgramProposer: the drafts are the tokens that followed an
earlier occurrence of the sequence's own suffix. Pure functions over token lists; no model, no state.
"""

from __future__ import annotations

from collections.abc import Sequence

from k2serve.engine.config import SpeculativeConfig


def ngram_propose(tokens: Sequence[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Up to `k` draft tokens for the sequence `tokens` (prompt + output so far).

    The match is the longest n-gram, min_n <= n <= max_n, that ends the sequence and also occurs
    earlier in it (ending before the last token; overlaps allowed); among equally long matches the
    earliest occurrence wins (vLLM's KMP search picks the same one). The drafts are the tokens right
    after that occurrence, at most k and no further than the sequence goes. [] when nothing matches.
    """
    total = len(tokens)
    if k < 1 or total < min_n or total < 2:
        return []
    last = tokens[-1]
    best_len, best_end = 0, -1
    for end in range(total - 1):  # `end`: the last token of an earlier occurrence
        if tokens[end] != last:
            continue
        n = 1
        while n < max_n and n <= end and tokens[end - n] == tokens[total - 1 - n]:
            n += 1
        if n > best_len:
            best_len, best_end = n, end
            if n == max_n:
                break
    if best_len < min_n:
        return []
    return list(tokens[best_end + 1 : best_end + 1 + k])


def propose(config: SpeculativeConfig, tokens: Sequence[int], limit: int) -> list[int]:
    """The drafts `config`'s method proposes for `tokens`, at most `limit` (and num_speculative_tokens)."""
    k = min(limit, config.num_speculative_tokens)
    return ngram_propose(tokens, k, config.prompt_lookup_max, config.prompt_lookup_min)
