"""Suffix decoding (speculative_config method "suffix"): the suffix tree against brute force (counts,
drafts, eviction), the per-sequence backoff, and greedy exactness of the engine with it (mixed
batches, prefix hits, preemption, a retried request, drafts that keep failing)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_spec_decode import generate, greedy, make_engine, run_all, workload

from k2serve.engine.config import EngineConfigError, SpeculativeConfig
from k2serve.engine.spec_decode import Proposer, SuffixTree, ngram_propose

SUFFIX = {
    "method": "suffix",
    "num_speculative_tokens": 4,
    "suffix_decoding_max_tree_depth": 16,
    "suffix_decoding_max_spec_factor": 1.0,
    "suffix_decoding_min_token_prob": 0.1,
}


# ---- brute force: what the trees must equal -------------------------------------------------------


def occurrences(seqs: list[list[int]], w: list[int]) -> int:
    n = len(w)
    return sum(1 for s in seqs for i in range(len(s) - n + 1) if s[i : i + n] == w)


def followers(seqs: list[list[int]], w: list[int]) -> Counter[int]:
    n = len(w)
    return Counter(s[i + n] for s in seqs for i in range(len(s) - n) if s[i : i + n] == w)


def brute_speculate(
    seqs: list[list[int]], context: list[int], depth: int, limit: int, factor: float, min_prob: float
) -> tuple[float, list[int]]:
    """The suffix-decoding rule by scanning: for each suffix w of the context (|w| <= depth) that
    occurs, follow the most frequent next token (ties: smaller id) while prob = product of
    occ(w + c) / occ(w) >= min_prob, at most min(limit, floor(factor x |w|)) tokens and |w + draft|
    <= depth; the highest sum of probabilities wins, the longer match on a tie."""
    best: tuple[float, list[int]] = (0.0, [])
    for length in range(1, min(len(context), depth) + 1):
        w = context[len(context) - length :]
        if occurrences(seqs, w) == 0:
            break
        cap = min(limit, int(factor * length + 1e-6))
        cur, prob, score, tokens = list(w), 1.0, 0.0, []
        while len(tokens) < cap and len(cur) < depth:
            nxt = followers(seqs, cur)
            if not nxt:
                break
            tok, count = min(nxt.items(), key=lambda kv: (-kv[1], kv[0]))
            prob *= count / occurrences(seqs, cur)
            if prob < min_prob:
                break
            tokens.append(tok)
            score += prob
            cur.append(tok)
        if score >= best[0]:
            best = (score, tokens)
    return best


def tree_strings(tree: SuffixTree) -> dict[tuple[int, ...], int]:
    """Every node's string and count."""
    out: dict[tuple[int, ...], int] = {}
    stack: list[tuple[tuple[int, ...], int]] = [((), tree.ROOT)]
    while stack:
        path, node = stack.pop()
        for tok, child in tree.kids[node].items():
            out[path + (tok,)] = tree.counts[child]
            stack.append((path + (tok,), child))
    return out


def brute_strings(seqs: list[list[int]], depth: int) -> dict[tuple[int, ...], int]:
    counts: Counter[tuple[int, ...]] = Counter()
    for s in seqs:
        for i in range(len(s)):
            for n in range(1, min(depth, len(s) - i) + 1):
                counts[tuple(s[i : i + n])] += 1
    return dict(counts)


# ---- the tree -------------------------------------------------------------------------------------


def test_tree_counts_are_occurrences_and_truncation_and_removal_free_nodes() -> None:
    rng = random.Random(0)  # noqa: S311 (test data, not secrets)
    for trial in range(40):
        depth = 1 + trial % 6
        tree = SuffixTree(depth)
        seqs = {k: [rng.randrange(3) for _ in range(rng.randrange(0, 20))] for k in range(5)}
        for k, s in seqs.items():
            tree.extend(k, s)
        most = tree.num_nodes  # removals and truncations only free nodes
        live = dict(seqs)
        for k in rng.sample(sorted(seqs), 5):
            expected = brute_strings(list(live.values()), depth)
            assert tree_strings(tree) == expected
            assert tree.num_nodes == len(expected)
            assert tree.counts[tree.ROOT] == sum(len(s) for s in live.values())
            cut = rng.randrange(len(live[k]) + 1)
            tree.truncate(k, cut)
            live[k] = live[k][:cut]
            assert tree_strings(tree) == brute_strings(list(live.values()), depth)
            tree.remove(k)
            del live[k]
        assert (
            tree.num_nodes == 0
            and not tree.kids[tree.ROOT]
            and tree.counts[tree.ROOT] == 0
            and len(tree) == 0
        )
        # freed ids are reused, so the arrays hold no more nodes than the most alive at once
        assert len(tree.counts) == len(tree.kids) == 1 + len(tree._free) <= 1 + most


def test_common_prefix_len() -> None:
    from k2serve.engine.spec_decode import common_prefix_len

    rng = random.Random(3)  # noqa: S311 (test data, not secrets)
    for _ in range(300):
        a = [rng.randrange(2) for _ in range(rng.randrange(0, 12))]
        b = a[: rng.randrange(len(a) + 1)] + [rng.randrange(2) for _ in range(rng.randrange(0, 5))]
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        assert common_prefix_len(a, b) == common_prefix_len(b, a) == n


def test_tree_tail_is_the_suffix_nodes() -> None:
    tree = SuffixTree(3)
    tree.extend("s", [4, 5, 4, 5])
    assert [tree.counts[n] for n in tree.tail("s")] == [2, 2, 1]  # "5", "4 5", "5 4 5"
    assert tree.find([4, 5]) == tree.tail("s")[1] and tree.find([5, 5]) is None
    assert tree.find([4, 5, 4, 5]) is None  # deeper than max_depth


@pytest.mark.parametrize(
    ("prompt", "factor", "min_prob", "expected"),
    [
        ([1, 2, 3, 4, 1, 2], 1.0, 0.1, [3, 4]),  # "1 2" matched: 3 (p 1/2), then 4 (p 1/2)
        ([1, 2, 3, 4, 1, 2], 1.0, 0.6, []),  # p 1/2 < 0.6: no draft
        ([1, 2, 3, 4, 1, 2], 0.5, 0.1, [3]),  # a 2-token match earns one token
        ([7, 1, 7, 2, 7, 1, 7], 2.0, 0.1, [2, 7, 1, 7]),  # "7 1 7": 2 (p 1/2), then what followed it
        ([5, 5, 5, 5], 1.0, 0.1, [5, 5]),  # "5 5" (3 overlapping): 5 (p 2/3), 5 (p 1/3): score 1
        ([3, 8, 3, 9, 3], 1.0, 0.1, [8]),  # tie 8 / 9 after "3": the smaller id
    ],
)
def test_suffix_drafts_by_hand(
    prompt: list[int], factor: float, min_prob: float, expected: list[int]
) -> None:
    cfg = SpeculativeConfig(
        "suffix", 8, suffix_decoding_max_spec_factor=factor, suffix_decoding_min_token_prob=min_prob
    )
    assert Proposer(cfg).propose("r", prompt, [], 8) == expected
    assert brute_speculate([prompt], prompt, 24, 8, factor, min_prob)[1] == expected


def test_suffix_proposer_equals_brute_force_over_random_requests() -> None:
    """Interleaved requests, tokens from a 3-token vocabulary (many matches and ties), drafts asked at
    random times (so the trees catch up several tokens at once): every proposal equals brute force
    over the request's own prompt + output and over the cached outputs (the last N requests that
    have output, live ones included as far as they last asked), the request's own on a tie; at
    most N outputs stay cached. Most prompts start with an earlier request's prompt + output (agent
    turns), so own trees are adopted from finished requests and cut back."""
    rng = random.Random(1)  # noqa: S311 (test data, not secrets)
    checked = drafted = reused = 0
    for trial in range(12):
        depth, cached = 2 + trial % 5, 1 + trial % 3
        factor, min_prob = (1.0, 0.5, 2.0)[trial % 3], (0.1, 0.0, 0.3, 1.0)[trial % 4]
        cfg = SpeculativeConfig(
            "suffix",
            1 + trial % 5,
            suffix_decoding_max_tree_depth=depth,
            suffix_decoding_max_cached_requests=cached,
            suffix_decoding_max_spec_factor=factor,
            suffix_decoding_min_token_prob=min_prob,
        )
        proposer = Proposer(cfg)
        order: list[str] = []  # requests in the order their output first reached the proposer
        outputs: dict[str, list[int]] = {}
        seen: dict[str, int] = {}  # output tokens the proposer has seen of each request
        live: dict[str, list[int]] = {}
        prompts: dict[str, list[int]] = {}
        for n in range(10):
            prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
            done = [r for r in prompts if r not in live]
            if done and rng.random() < 0.6:  # a next turn: an earlier request's prompt + output, cut
                earlier = rng.choice(done)
                whole = prompts[earlier] + outputs[earlier]
                prompt = whole[: rng.randrange(len(whole) // 2, len(whole) + 1)] + prompt[:3]
            live[f"r{trial}-{n}"] = prompts[f"r{trial}-{n}"] = prompt
            outputs[f"r{trial}-{n}"] = []
            while len(live) > 2 or (n == 9 and live):
                rid = rng.choice(sorted(live))
                out = outputs[rid]
                out.append(rng.randrange(3))
                if rng.random() < 0.6:
                    limit = rng.randrange(0, 6)
                    got = proposer.propose(rid, live[rid], out, limit)
                    k = min(limit, cfg.num_speculative_tokens)
                    if k >= 1:  # else the proposer returns [] at once, the trees untouched
                        seen[rid] = len(out)
                        if rid not in order:
                            order.append(rid)
                        context = live[rid] + out
                        own = brute_speculate([context], context, depth, k, factor, min_prob)
                        window = [outputs[r][: seen[r]] for r in order[-cached:]]
                        other = brute_speculate(window, context, depth, k, factor, min_prob)
                        assert got == (other[1] if other[0] > own[0] else own[1]), (trial, rid)
                        checked += 1
                        drafted += bool(got)
                if len(out) >= 8 or rng.random() < 0.1:
                    proposer.finish(rid, out)
                    seen[rid] = len(out)
                    if rid not in order:
                        order.append(rid)
                    del live[rid]
        suffix = proposer.suffix
        assert suffix is not None and not suffix.local
        assert len(suffix.global_tree) == cached and len(suffix._parked) <= suffix.PARKED
        reused += suffix.num_reused
        window = [outputs[r] for r in order[-cached:]]
        assert tree_strings(suffix.global_tree) == brute_strings(window, depth)
    assert checked > 300 and 0.2 * checked < drafted < checked
    assert reused > 5  # later turns adopted (and cut back) an earlier request's own tree


def test_global_tree_memory_stays_bounded() -> None:
    """200 requests through a cache of 4: the global tree holds the last 4 outputs' substrings and
    nothing else; no request's own tree outlives it."""
    cfg = SpeculativeConfig(
        "suffix", 4, suffix_decoding_max_cached_requests=4, suffix_decoding_max_tree_depth=8
    )
    proposer = Proposer(cfg)
    rng = random.Random(2)  # noqa: S311 (test data, not secrets)
    outs = []
    for i in range(200):
        prompt = [rng.randrange(50) for _ in range(30)]
        out: list[int] = []
        for _ in range(20):
            out.append(rng.randrange(50))
            proposer.propose(f"q{i}", prompt, out, 4)
        proposer.finish(f"q{i}", out)
        outs.append(out)
    suffix = proposer.suffix
    assert suffix is not None and not suffix.local and len(suffix.global_tree) == 4
    assert suffix.global_tree.num_nodes == len(brute_strings(outs[-4:], 8)) <= 4 * 20 * 8


def test_zero_cached_requests_means_only_the_own_tree() -> None:
    cfg = SpeculativeConfig("suffix", 4, suffix_decoding_max_cached_requests=0)
    proposer = Proposer(cfg)
    proposer.finish("a", [6, 7, 8, 9])
    assert proposer.propose("b", [1, 6, 7], [], 4) == []
    assert proposer.propose("c", [1, 6, 7, 2, 6, 7], [], 4) == [2, 6]  # own tree: "6 7" then 2, 6
    assert proposer.suffix is not None and proposer.suffix.global_tree.num_nodes == 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("suffix_decoding_max_tree_depth", 0, "integer >= 1"),
        ("suffix_decoding_max_spec_factor", -0.5, "number in [0.0, 1024.0]"),
        ("suffix_decoding_min_token_prob", 1.5, "number in [0.0, 1.0]"),
        ("suffix_decoding_min_token_prob", "0.1", "number in [0.0, 1.0]"),
        ("suffix_decoding_max_cached_requests", -1, "integer >= 0"),
        ("suffix_decoding_max_tree_depth", True, "integer >= 1"),
    ],
)
def test_suffix_config_errors_name_the_field(field: str, value: Any, message: str) -> None:
    with pytest.raises(EngineConfigError) as e:
        SpeculativeConfig.parse({"method": "suffix", field: value})
    assert f"speculative_config.{field}" in str(e.value) and message in str(e.value)


def test_suffix_config_round_trip_and_unknown_key() -> None:
    cfg = SpeculativeConfig.parse(SUFFIX)
    assert cfg is not None and cfg.suffix_decoding_max_tree_depth == 16
    assert SpeculativeConfig.parse(cfg.to_json()) == cfg
    with pytest.raises(EngineConfigError, match=r"unknown field\(s\) \['suffix_decoding_max_depth'\]"):
        SpeculativeConfig.parse({"method": "suffix", "suffix_decoding_max_depth": 3})


# ---- the backoff ----------------------------------------------------------------------------------


def _skipped_after_miss(p: Proposer) -> int:
    """Record a verification of request "r" that accepted nothing, then count the steps the proposer
    skips before it drafts again (the prompt always drafts: with ngram and in its own suffix tree)."""
    p.record("r", 0)
    n = 0
    while not p.propose("r", [1, 2, 1, 2, 1, 2], [1], 4):
        n += 1
    return n


def test_backoff_schedule() -> None:
    """No draft accepted: skip 1 step, then 2, 4, 8, 16, 16 after further misses; an accepted draft
    resets it."""
    p = Proposer(SpeculativeConfig("ngram", 4))

    assert [_skipped_after_miss(p) for _ in range(6)] == [1, 2, 4, 8, 16, 16]
    p.record("r", 2)
    assert _skipped_after_miss(p) == 1 and _skipped_after_miss(p) == 2
    assert p.num_skipped == 1 + 2 + 4 + 8 + 16 + 16 + 1 + 2
    p.finish("r", [1])
    assert not p._skip and not p._misses


def test_ngram_drafts_at_most_two_per_matched_token() -> None:
    """A 1-gram match drafts at most 2 tokens, a 2-gram at most 4 (a short match's long draft mostly
    fails, and each rejected draft token costs a verifying row ~7% of a step on CPU)."""
    p = Proposer(SpeculativeConfig("ngram", 8, 4, 1))
    one = [5, 1, 2, 3, 4, 6, 7, 8, 5]  # "5": a 1-gram match
    assert ngram_propose(one, 8, 4, 1) == [1, 2, 3, 4, 6, 7, 8, 5]
    assert p.propose("a", one, [], 8) == [1, 2]
    two = [9, 5, 1, 2, 3, 4, 6, 7, 8, 9, 5]  # "9 5": a 2-gram match
    assert p.propose("b", two, [], 8) == [1, 2, 3, 4]
    three = [0, 9, 5, 1, 2, 3, 4, 6, 7, 8, 0, 9, 5]  # "0 9 5": a 3-gram match, at most 6
    assert ngram_propose(three, 8, 4, 1) == [1, 2, 3, 4, 6, 7, 8, 0]
    assert p.propose("c", three, [], 8) == [1, 2, 3, 4, 6, 7]


def test_suffix_backoff_starts_after_three_misses_and_stops_at_four_steps() -> None:
    p = Proposer(SpeculativeConfig("suffix", 4))

    assert [_skipped_after_miss(p) for _ in range(7)] == [0, 0, 1, 2, 4, 4, 4]
    p.record("r", 1)
    assert _skipped_after_miss(p) == 0 and p.num_skipped == 1 + 2 + 4 + 4 + 4


def test_ngram_drafts_again_only_from_a_longer_match_after_a_full_rejection() -> None:
    """ngram: drafts that followed an n-gram match and were all rejected raise the bar to n + 1 (at most
    prompt_lookup_max) for that sequence until a draft is accepted; the backoff still applies."""
    p = Proposer(SpeculativeConfig("ngram", 4, 4, 1))
    prompt = [1, 2, 3, 7, 3]
    assert p.propose("r", prompt, [], 4) == [7, 3]  # "3": a 1-gram match
    p.record("r", 0)
    assert p.propose("r", prompt, [2], 4) == [] and p.num_skipped == 1  # the backoff's one step
    assert ngram_propose([*prompt, 2], 4, 4, 1) == [3, 7, 3, 2]  # "2": a 1-gram match again ...
    assert p.propose("r", prompt, [2], 4) == [] and p.num_raised == 1  # ... not longer: dropped
    assert p.propose("other", prompt, [2], 4) == [3, 7]  # only that sequence's bar is raised
    assert p.propose("r", prompt, [7], 4) == [3, 7]  # "3 7": a 2-gram match drafts
    p.record("r", 1)  # accepted: back to prompt_lookup_min
    assert p.propose("r", prompt, [2], 4) == [3, 7] and p.num_raised == 1
    p.finish("r", [2])
    assert not p._min_len.get("r") and "r" not in p._match_len
    capped = Proposer(SpeculativeConfig("ngram", 4, 2, 1))
    assert capped.propose("r", prompt, [7], 4) == [3, 7]  # a 2-gram (prompt_lookup_max) fails ...
    capped.record("r", 0)
    capped.propose("r", prompt, [7], 4)  # the backoff's step
    assert capped.propose("r", prompt, [7], 4) == [3, 7]  # ... 2-grams still draft: the bar is capped


# ---- the engine: greedy exactness -----------------------------------------------------------------


def test_suffix_greedy_equal_mixed_batch(tiny_ckpt: Path) -> None:
    """Speculative rows next to prefill chunks, a sampled row and a request too near max_tokens to
    draft; then the same prompts again (now drafted from the cached outputs): greedy tokens equal
    the plain engine's, drafts were accepted."""
    from k2serve.engine.sampling_params import SamplingParams

    ps = workload()
    params = [greedy(24 + 2 * i) for i in range(len(ps))]
    params[3] = SamplingParams(temperature=0.9, seed=3, max_tokens=24, ignore_eos=True)
    params[4] = greedy(1)
    expected = generate(make_engine(tiny_ckpt, None, max_num_batched_tokens=40), ps, params)
    engine = make_engine(tiny_ckpt, SUFFIX, max_num_batched_tokens=40)
    got = generate(engine, ps, params)
    keep = [f"r{i}" for i in range(len(ps)) if i != 3]
    assert {k: got[k] for k in keep} == {k: expected[k] for k in keep}
    first = engine.spec_stats.num_accepted_tokens
    assert first > 0
    again = generate(engine, ps, params)
    assert {k: again[k] for k in keep} == {k: expected[k] for k in keep}
    # the cached outputs draft the repeated requests: many more accepted the second time
    assert engine.spec_stats.num_accepted_tokens - first > first
    assert engine.proposer is not None and engine.proposer.suffix is not None
    assert not engine.proposer.suffix.local  # no request's own tree outlives it


@pytest.mark.slow
def test_suffix_prefix_hits_and_preemption(tiny_ckpt: Path) -> None:
    """A follow-up whose prompt is the first turn's prompt + output (a prefix hit on blocks that
    accepted drafts filled), and a pool too small for the batch (preemption): tokens equal."""
    ps = workload()
    p = ps[0]
    outs: dict[str, list[list[int]]] = {}
    for name, spec in (("plain", None), ("suffix", SUFFIX)):
        engine = make_engine(tiny_ckpt, spec)
        first = generate(engine, [p], [greedy(32)])["r0"]
        engine.add_request("again", p + first[:30], greedy(20))
        second = run_all(engine, check_blocks=True)["again"]
        assert second.num_cached_tokens >= len(p) + 24
        outs[name] = [first, second.token_ids]
        if spec is not None:  # the follow-up adopted the first request's own tree, cut back
            assert engine.proposer is not None and engine.proposer.suffix is not None
            assert engine.proposer.suffix.num_reused == 1
    assert outs["suffix"] == outs["plain"]
    expected = generate(make_engine(tiny_ckpt, None), ps, [greedy(32) for _ in ps])
    tight = make_engine(tiny_ckpt, SUFFIX, num_kv_blocks=20)
    assert generate(tight, ps, [greedy(32) for _ in ps]) == expected
    assert tight.scheduler.num_preemptions > 0 and tight.spec_stats.num_accepted_tokens > 0


def test_backoff_changes_no_tokens(tiny_ckpt: Path) -> None:
    """Drafts that are always wrong: the backoff stops most of them (fewer verifications than decode
    steps), and the tokens are the plain engine's."""
    ps = workload()
    refs = generate(make_engine(tiny_ckpt, None), ps, [greedy(30) for _ in ps])
    engine = make_engine(tiny_ckpt, SUFFIX)
    proposer = engine.proposer
    assert proposer is not None and proposer.suffix is not None

    def wrong(rid: str, prompt: list[int], output: list[int], limit: int) -> list[int]:
        ref = refs[rid]
        return [(t + 1) % 1000 for t in ref[len(output) : len(output) + limit]]

    proposer.suffix.propose = wrong  # type: ignore[method-assign]
    assert generate(engine, ps, [greedy(30) for _ in ps]) == refs
    s = engine.spec_stats
    assert s.num_accepted_tokens == 0 and proposer.num_skipped > 0
    assert s.num_drafts + proposer.num_skipped <= len(ps) * 29
    assert s.num_drafts < len(ps) * 29 // 2  # most decode steps drafted nothing


# ---- the benchmark --------------------------------------------------------------------------------


def test_agent_conversation_holds_tool_results_and_replies(tiny_ckpt: Path) -> None:
    """The agent workload's prompts: chat template, declared tools, the model's reply, the tool call it
    made (or the scripted one), and the JSON tool result, all in the next turn's prompt."""
    from k2serve.bench.spec_decode import Conversation
    from k2serve.chat.prompt import PromptEncoder
    from k2serve.chat.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_ckpt)
    enc = PromptEncoder(tok)
    conv = Conversation(enc, random.Random(0))  # noqa: S311 (test data, not secrets)
    first = tok.decode(conv.prompt())
    assert "read_file" in first and conv.repo.task in first
    conv.answer(tok.encode("I will look at the files."))  # no tool call: the scripted list_files
    second = tok.decode(conv.prompt())
    assert second.startswith(first[: len(first) - 20])
    assert "I will look at the files." in second and "## Return of functions.list_files:0" in second
    assert all(p in second for p in conv.repo.paths)
    call = "<|tool_calls_section_begin|><|tool_call_begin|>functions.read_file:7<|tool_call_argument_begin|>"
    path = conv.repo.paths[1]
    reply = enc.encode_rendered(
        call + json.dumps({"path": path}) + "<|tool_call_end|><|tool_calls_section_end|>"
    )
    conv.answer(reply)  # the model's own call is the one answered
    third = tok.decode(conv.prompt())
    assert "## Return of functions.read_file:7" in third and conv.repo.code[path].splitlines()[2] in third


def test_bench_runs_at_toy_size(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`k2serve bench spec-decode` on the tiny checkpoint, every workload, one round: it checks the
    three methods' greedy tokens equal (else it fails) and reports rates and acceptance."""
    from k2serve.bench.spec_decode import main

    # every draft verified: the acceptance asserted below does not depend on the step times then
    argv = ["--model", str(tiny_ckpt), "--rounds", "1", "--output-len", "8", "--turns", "2", "--json"]
    argv.append("--no-draft-budget")
    suffix = [
        "--suffix-max-tree-depth",
        "12",
        "--suffix-min-token-prob",
        "0.3",
        "--suffix-max-spec-factor",
        "2",
    ]
    assert main([*argv, "--conversations", "1", *suffix]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["speculative_config"]["suffix"] == {
        "method": "suffix",
        "num_speculative_tokens": 8,
        "suffix_decoding_max_tree_depth": 12,
        "suffix_decoding_min_token_prob": 0.3,
        "suffix_decoding_max_spec_factor": 2.0,
    }
    assert set(report["workloads"]) == {"agent", "tools", "repeat", "random"}
    for name, w in report["workloads"].items():
        assert w["tokens_per_round"] > 0, name
        for kind in ("cpu", "wall"):
            assert w[kind]["none"]["median_tok_s"] > 0 and w[kind]["suffix"]["median_speedup"] > 0
        for m in ("ngram", "suffix"):
            assert 0.0 <= w["spec"][m]["acceptance_rate"] <= 1.0
    assert report["workloads"]["repeat"]["spec"]["suffix"]["accepted_tokens"] > 0
    assert report["workloads"]["agent"]["requests_per_round"] == 2
    assert report["workloads"]["tools"]["requests_per_round"] >= 1  # one conversation, 1-4 model turns
