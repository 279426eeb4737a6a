"""Speculative decoding (ngram prompt lookup): the proposer, the config, and exactness of the engine
with it: greedy tokens equal the engine's without it (batches, prefix hits, preemption, stops), sampled
tokens are distributed as without it (rejection sampling), and rejected drafts leave no KV behind."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from k2serve.engine.config import EngineConfig, EngineConfigError, SpeculativeConfig
from k2serve.engine.llm import LLM
from k2serve.engine.llm_engine import LLMEngine, RequestOutput
from k2serve.engine.sampler import Sampler
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.spec_decode import DraftBudget, Proposer, ngram_propose

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}


# ---- the proposer ---------------------------------------------------------------------------------


def vllm_ngram(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """vLLM v1's NgramProposer search (`_find_longest_matched_ngram_and_propose_tokens`: KMP over the
    reversed sequence), transcribed as the reference for `ngram_propose`."""
    total = len(tokens)
    if total < min_n:
        return []
    rev = tokens[::-1]
    lps = [0] * max_n
    longest, position, prev, i = 0, 0, 0, 1
    while i < total:
        if rev[prev] == rev[i]:
            prev += 1
            if prev >= longest:
                longest, position = prev, i
            if i < max_n:
                lps[i] = prev
            if prev == max_n:
                prev = lps[max_n - 1]
            i += 1
        elif prev != 0:
            prev = lps[prev - 1]
        else:
            i += 1
    if longest < min_n:
        return []
    start = total - 1 - position + longest
    return tokens[start : start + min(k, total - start)]


@pytest.mark.parametrize(
    ("tokens", "k", "max_n", "min_n", "expected"),
    [
        ([1, 2, 3, 4, 1, 2], 2, 3, 1, [3, 4]),  # suffix [1, 2] seen at the start
        ([1, 2, 9, 5, 2, 8, 1, 2], 2, 2, 1, [9, 5]),  # the 2-gram beats the later 1-gram "2"
        ([7, 1, 7, 2, 7], 2, 1, 1, [1, 7]),  # equally long: the earliest occurrence
        ([1, 2, 3, 4], 3, 3, 1, []),  # nothing recurs
        ([5, 1, 6, 1], 3, 3, 2, []),  # only a 1-gram recurs, min_n is 2
        ([1, 2, 1], 5, 3, 1, [2, 1]),  # no further than the sequence goes
        ([3, 3, 3], 4, 2, 1, [3]),  # overlapping occurrence
        ([9], 3, 3, 1, []),
    ],
)
def test_ngram_propose_cases(tokens: list[int], k: int, max_n: int, min_n: int, expected: list[int]) -> None:
    assert ngram_propose(tokens, k, max_n, min_n) == expected


def test_ngram_propose_matches_vllm_search() -> None:
    g = torch.Generator().manual_seed(0)
    checked = proposed = 0
    for trial in range(3000):
        n = int(torch.randint(1, 40, (1,), generator=g))
        vocab = int(torch.randint(2, 6, (1,), generator=g))
        tokens = torch.randint(0, vocab, (n,), generator=g).tolist()
        max_n = 1 + trial % 5
        min_n = 1 + (trial // 5) % max_n
        k = 1 + trial % 7
        got = ngram_propose(tokens, k, max_n, min_n)
        assert got == vllm_ngram(tokens, min_n, max_n, k), (tokens, k, max_n, min_n)
        checked += 1
        proposed += bool(got)
    assert checked == 3000 and 1000 < proposed < 3000


# ---- the config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("{not json", "not valid JSON"),
        ('{"method": "eagle"}', "speculative_config.method"),
        ('{"num_speculative_tokens": 2}', "speculative_config.method is required"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "speculative_config.num_speculative_tokens"),
        ('{"method": "ngram", "num_speculative_tokens": "3"}', "speculative_config.num_speculative_tokens"),
        ('{"method": "ngram", "prompt_lookup_max": 2, "prompt_lookup_min": 3}', "prompt_lookup_min (3)"),
        ('{"method": "ngram", "prompt_lookup_min": -1}', "speculative_config.prompt_lookup_min"),
        ('{"method": "ngram", "draft_model": "x"}', "unknown field(s) ['draft_model']"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_speculative_config_errors_name_the_field(value: str, field: str) -> None:
    with pytest.raises(EngineConfigError) as e:
        EngineConfig(speculative_config=value)  # type: ignore[arg-type]
    assert field in str(e.value)


def test_speculative_config_parse_round_trip() -> None:
    cfg = EngineConfig(speculative_config=SPEC)  # type: ignore[arg-type]
    assert cfg.speculative_config == SpeculativeConfig("ngram", 4, 4, 1)
    assert SpeculativeConfig.parse(cfg.speculative_config.to_json()) == cfg.speculative_config
    assert EngineConfig().speculative_config is None


# ---- the engine: greedy exactness -----------------------------------------------------------------


def make_engine(ckpt: Path, spec: dict[str, Any] | None, budget: bool = False, **kw: Any) -> LLMEngine:
    """A tiny fp32 engine; without `budget` every proposed draft is verified (the engine's DraftBudget,
    which trims drafts by measured step times, off: the tests' draft counts do not depend on timing)."""
    base = {"num_kv_blocks": 512, "block_size": 8, "max_num_batched_tokens": 96, "speculative_config": spec}
    engine = LLMEngine.from_pretrained(ckpt, torch.float32, EngineConfig(**(base | kw)))
    if not budget:
        engine.draft_budget = None
    return engine


def run_all(engine: LLMEngine, check_blocks: bool = False) -> dict[str, RequestOutput]:
    """Step to the end; returns each request's final output. With check_blocks, the block manager's
    invariants (ref counts = the live tables) are checked after every step."""
    out: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o
        if check_blocks:
            engine.blocks.check_invariants([s.block_table for s in engine.scheduler.running])
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    engine.blocks.check_invariants([])
    return out


def workload() -> list[list[int]]:
    """Repetitive prompts the tiny preset (seed 0) continues repetitively, so drafts get accepted (one
    token 16 times; two 4-token phrases 6 times), and two random prompts."""
    g = torch.Generator().manual_seed(0)
    phrases = [torch.randint(0, 1000, (4,), generator=g).tolist() for _ in range(5)]
    rand = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (30, 7)]
    return [[777] * 16, phrases[0] * 6, phrases[4] * 6, *rand]


def generate(engine: LLMEngine, ps: list[list[int]], params: list[SamplingParams]) -> dict[str, list[int]]:
    for i, (p, sp) in enumerate(zip(ps, params, strict=True)):
        engine.add_request(f"r{i}", p, sp)
    return {k: o.token_ids for k, o in run_all(engine, check_blocks=True).items()}


def greedy(max_tokens: int = 40, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_greedy_equal_with_and_without_speculation(tiny_ckpt: Path) -> None:
    ps = workload()
    params = [greedy(24 + 3 * i) for i in range(len(ps))]
    expected = generate(make_engine(tiny_ckpt, None), ps, params)
    spec = make_engine(tiny_ckpt, SPEC)
    got = generate(spec, ps, params)
    assert got == expected
    s = spec.spec_stats
    assert s.num_accepted_tokens > 0 and s.num_draft_tokens > s.num_accepted_tokens  # accepts and rejects
    assert 0 < s.acceptance_rate < 1 and s.mean_accepted_per_step > 1
    # the random prompts' failed 1-gram drafts raised their bar (and the tokens stayed the same)
    assert spec.proposer is not None and spec.proposer.num_raised > 0
    # fewer forward steps than tokens: accepted drafts emitted several tokens per step
    assert spec.num_computed_tokens_total > sum(len(p) for p in ps)


def test_draft_budget_keeps_the_drafts_worth_their_time() -> None:
    """DraftBudget times the plain step first, tries one draft every 4th call until a draft count is
    timed (then one more than its estimate every 32nd call), prices counts past the largest timed one at
    its cost a draft, and keeps the count with the most expected tokens per second (10% over none), the
    proposer's cost per token included."""
    b = DraftBudget(4)
    assert b.budget(1, 0) == 0 and b.budget(1, 3) == 0  # the plain step is not timed yet
    b.observe_step(1, 1.0e-3)
    kept = [b.budget(1, 3)]
    while kept[-1] != 1 and len(kept) < 8:
        kept.append(b.budget(1, 3))
    assert len(kept) <= DraftBudget.EXPLORE_UNTIMED and set(kept[:-1]) == {0}, kept
    b.observe_step(2, 1.05e-3)  # 1 draft: +5%; 2 and 3 priced at +5% a draft
    assert b.budget(1, 3) == 3  # acceptance unknown (1/2 a position): 1.875 / 1.15 the best
    b.observe_step(3, 1.1e-3)
    b.observe_step(4, 1.2e-3)
    assert b.budget(1, 3) == 3  # 1.875 / 1.2 within 5% of the best, 1.75 / 1.1: the most drafts
    for _ in range(40):
        b.observe_verify(3, 0)  # every first draft rejected: 1/42 at position 0
    trimmed = b.num_trimmed
    assert b.budget(1, 3) == 0 and b.num_trimmed == trimmed + 3  # 1 / 1.0 beats 1.02 / 1.05
    for _ in range(400):
        b.observe_verify(3, 3)  # then every draft accepted
    assert b.budget(1, 3) == 3  # 3.7 / 1.2
    for _ in range(4):
        b.observe_step(4, 5.0e-3)  # the 4-row step got slow (a larger bucket): 4 of its last 5 times
    assert b.budget(1, 3) == 2 and b.budget(1, 4) == 2  # 2.8 / 1.1 beats 3.7 / 5.0, and 4.6 / 6.3 (priced)
    while b.calls % DraftBudget.EXPLORE_EVERY != DraftBudget.EXPLORE_EVERY - 1:
        b.budget(1, 3)
    assert b.budget(1, 3) == 3  # the exploring call: one more than the estimate's 2
    b.observe_step(2, 1.5)  # a step that compiled a bucket: its time is not the row count's
    assert b.step_time(2) == 1.05e-3 and b.budget(1, 1) == 1
    b.observe_propose(1.0e-3)  # proposing costs as much as a step: one draft (1.9 / 2.05) no longer pays
    assert b.budget(1, 1) == 0
    for _ in range(8):
        b.observe_propose(0.032, tokens=320)  # catching up on 320 tokens: 0.1 ms a token
    assert b.budget(1, 1) == 1


def test_draft_budget_trims_in_the_engine_greedy_equal(tiny_ckpt: Path) -> None:
    """With step times that make verifying rows dear (a 2+ row step 20x a plain one), the engine's budget
    verifies almost none of the proposed drafts, and the tokens are those of the engine without drafts."""
    ps = workload()
    params = [greedy(20) for _ in ps]
    expected = generate(make_engine(tiny_ckpt, None), ps, params)
    engine = make_engine(tiny_ckpt, SPEC, budget=True, max_num_seqs=1)
    budget = engine.draft_budget
    assert budget is not None
    for rows in range(1, 10):
        budget.observe_step(rows, 1.0 if rows == 1 else 20.0)
    budget.observe_step = lambda rows, seconds: None  # type: ignore[method-assign]  # keep these
    assert generate(engine, ps, params) == expected
    assert budget.num_trimmed > 0 and budget.calls > 0
    # only the exploring calls (every 32nd) verified drafts, one each
    s = engine.spec_stats
    assert s.num_drafts == s.num_draft_tokens <= budget.calls // DraftBudget.EXPLORE_EVERY


def test_verifying_rows_run_in_the_captured_step_greedy_equal(tiny_ckpt: Path) -> None:
    """With the captured decode step (its static forward run eagerly here, as test_captured's padding
    tests do; Inductor's compile of it is the same code), a step of speculative rows runs as one decode
    row per verified position (their latents written before any row attends, so each position sees the
    drafts before it): buckets sized for max_num_seqs x (1 + num_speculative_tokens) rows, the verifying
    steps served captured, and the greedy tokens those of the engine without drafts."""
    from k2serve.engine.captured import CapturedDecode

    ps = workload()
    params = [greedy(24 + 3 * i) for i in range(len(ps))]
    expected = generate(make_engine(tiny_ckpt, None), ps, params)
    spec = make_engine(tiny_ckpt, SPEC, max_num_seqs=4)
    rows = spec.config.max_num_seqs * (1 + SPEC["num_speculative_tokens"])
    captured = CapturedDecode(spec.model, spec.pool, spec.runner.pad_slot, rows, 16, compile=False)
    assert captured.sizes[-1] >= rows == 20
    spec.runner.captured = captured
    served: list[int] = []
    run = captured.run

    def counted(decode_rows: Any, run: Any = run) -> torch.Tensor:
        served.append(len(decode_rows))
        return run(decode_rows)

    captured.run = counted  # type: ignore[method-assign]
    got = generate(spec, ps, params)
    assert got == expected
    assert spec.spec_stats.num_accepted_tokens > 0
    assert max(served) > spec.config.max_num_seqs  # steps with drafts ran captured, a row per position


@pytest.mark.slow
def test_greedy_equal_one_at_a_time_and_mixed_with_plain_rows(tiny_ckpt: Path) -> None:
    """Speculative rows batched with prefill chunks, sampled rows and a request too near max_tokens to
    draft; then each request alone: the greedy tokens are the same."""
    ps = workload()
    params = [greedy(30) for _ in ps]
    params[3] = SamplingParams(temperature=0.9, seed=3, max_tokens=30, ignore_eos=True)
    params[4] = greedy(1)  # no room for drafts
    expected = generate(make_engine(tiny_ckpt, None, max_num_batched_tokens=40), ps, params)
    spec = make_engine(tiny_ckpt, SPEC, max_num_batched_tokens=40)  # chunked prefill next to drafts
    got = generate(spec, ps, params)
    assert spec.spec_stats.num_accepted_tokens > 0
    greedy_ids = [f"r{i}" for i in range(len(ps)) if i != 3]
    assert {k: got[k] for k in greedy_ids} == {k: expected[k] for k in greedy_ids}
    assert len(got["r3"]) == 30
    for i in (0, 1):
        alone = make_engine(tiny_ckpt, SPEC)
        assert generate(alone, [ps[i]], [params[i]])["r0"] == expected[f"r{i}"]


@pytest.mark.slow
def test_prefix_cache_hits_on_blocks_computed_with_drafts(tiny_ckpt: Path) -> None:
    """A second request whose prompt is the first one's prompt + output reuses blocks that accepted
    drafts filled: its tokens equal the no-speculation engine's, and it hit the cache."""
    p = workload()[0]
    engines = {name: make_engine(tiny_ckpt, spec) for name, spec in (("plain", None), ("spec", SPEC))}
    outs: dict[str, list[list[int]]] = {}
    for name, engine in engines.items():
        first = generate(engine, [p], [greedy(32)])["r0"]
        engine.add_request("again", p + first[:30], greedy(20))
        second = run_all(engine, check_blocks=True)["again"]
        assert second.num_cached_tokens >= len(p) + 24
        outs[name] = [first, second.token_ids]
    assert outs["spec"] == outs["plain"]
    assert engines["spec"].spec_stats.num_accepted_tokens > 0


@pytest.mark.slow
def test_preemption_with_speculation(tiny_ckpt: Path) -> None:
    ps = workload()
    params = [greedy(32) for _ in ps]
    expected = generate(make_engine(tiny_ckpt, None), ps, params)
    tight = make_engine(tiny_ckpt, SPEC, num_kv_blocks=20)  # 160 slots for 5 x ~55 tokens: must preempt
    got = generate(tight, ps, params)
    assert tight.scheduler.num_preemptions > 0
    assert tight.spec_stats.num_accepted_tokens > 0
    assert got == expected


@pytest.mark.slow
def test_stops_inside_accepted_runs(tiny_ckpt: Path) -> None:
    """Stop tokens, EOS and max_tokens cut a run of accepted drafts exactly where the plain engine
    stops; nothing after the stop is emitted."""
    ps = workload()
    free = generate(make_engine(tiny_ckpt, None), ps, [greedy(32) for _ in ps])
    spec = make_engine(tiny_ckpt, SPEC)
    cases: dict[str, tuple[list[int], SamplingParams, list[int]]] = {}
    for i, p in enumerate(ps):
        ref = free[f"r{i}"]
        for t in sorted(set(ref[1:]))[:6]:
            cut = ref[: ref.index(t) + 1]
            cases[f"stop-{i}-{t}"] = (p, greedy(32, stop_token_ids=[t]), cut)
        for m in (1, 2, 11, 17):
            cases[f"len-{i}-{m}"] = (p, greedy(m), ref[:m])
    for rid, (p, sp, _) in cases.items():
        spec.add_request(rid, p, sp)
    outs = run_all(spec, check_blocks=True)
    assert {rid: outs[rid].token_ids for rid in cases} == {rid: c[2] for rid, c in cases.items()}
    for rid, o in outs.items():
        assert o.finish_reason == ("stop" if rid.startswith("stop") else "length"), rid
    assert spec.spec_stats.num_accepted_tokens > 0


def oracle(engine: LLMEngine, continuation: list[int]) -> None:
    """Make `engine` draft the known greedy continuation (so every draft is accepted: a long run)."""

    def propose(seq: Any, limit: int) -> list[int]:
        n = len(seq.output_token_ids)
        return continuation[n : n + min(limit, 4)]

    engine.scheduler.proposer = propose


def test_stop_on_an_accepted_draft_drops_the_rest(tiny_ckpt: Path) -> None:
    """With drafts that are all right, each step emits 5 tokens; a stop token met on an accepted draft
    that has more after it ends the run there: the step emits the tokens up to the stop and no more,
    and the blocks that held the dropped drafts return to the pool."""
    p = workload()[3]
    ref = generate(make_engine(tiny_ckpt, None), [p], [greedy(24)])["r0"]
    stop = ref[8]
    assert stop not in ref[:8]
    engine = make_engine(tiny_ckpt, SPEC)
    oracle(engine, ref)
    engine.add_request("r", p, greedy(24, stop_token_ids=[stop]))
    steps = []
    while engine.has_unfinished_requests():
        steps.extend(o.new_token_ids for o in engine.step())
        engine.blocks.check_invariants([s.block_table for s in engine.scheduler.running])
    # prefill: token 0; then 1 + 4 drafts per step: 1..5, then 6, 7, 8 (stop) and 9, 10 dropped
    assert steps == [ref[:1], ref[1:6], ref[6:9]]
    assert engine.spec_stats.num_accepted_tokens == 4 + 3 and engine.spec_stats.num_draft_tokens == 8
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    free = generate(make_engine(tiny_ckpt, SPEC), [p], [greedy(24, stop_token_ids=[stop])])["r0"]
    assert free == ref[:9]


@pytest.mark.slow
def test_all_drafts_accepted_and_a_wrong_one_rejected(tiny_ckpt: Path) -> None:
    """Drafts from the right continuation with every 7th token wrong: the output is still the greedy
    one, and the step after a wrong draft emits the model's token in its place."""
    ps = workload()
    refs = generate(make_engine(tiny_ckpt, None), ps, [greedy(30) for _ in ps])
    engine = make_engine(tiny_ckpt, SPEC)
    wrong = {k: [t if i % 7 != 3 else (t + 1) % 1000 for i, t in enumerate(r)] for k, r in refs.items()}

    def propose(seq: Any, limit: int) -> list[int]:
        n = len(seq.output_token_ids)
        return wrong[seq.request_id][n : n + min(limit, 4)]

    engine.scheduler.proposer = propose
    assert generate(engine, ps, [greedy(30) for _ in ps]) == refs
    s = engine.spec_stats
    assert s.num_draft_tokens > s.num_accepted_tokens > s.num_draft_tokens // 2


@pytest.mark.slow
def test_eos_honoured_inside_a_run_unless_ignore_eos(tiny_ckpt: Path) -> None:
    ps = workload()
    ref = generate(make_engine(tiny_ckpt, None), ps[:2], [greedy(32)] * 2)
    eos = ref["r0"][10]
    spec = make_engine(tiny_ckpt, SPEC)
    spec.eos_token_ids = [eos]
    got = generate(spec, ps[:2], [SamplingParams(temperature=0.0, max_tokens=40), greedy(32)])
    assert got["r0"] == ref["r0"][: ref["r0"].index(eos) + 1]
    assert got["r1"] == ref["r1"]  # ignore_eos


def test_llm_speculative_config_argument(tiny_ckpt: Path) -> None:
    ps = workload()[:2]
    plain = LLM(tiny_ckpt, engine_config=EngineConfig(num_kv_blocks=256, block_size=8))
    spec = LLM(
        tiny_ckpt, engine_config=EngineConfig(num_kv_blocks=256, block_size=8), speculative_config=SPEC
    )
    assert spec.engine.config.speculative_config == SpeculativeConfig("ngram", 4, 4, 1)
    assert [o.token_ids for o in spec.generate(ps, greedy(30))] == [
        o.token_ids for o in plain.generate(ps, greedy(30))
    ]
    with pytest.raises(EngineConfigError, match="speculative_config.method"):
        LLM(tiny_ckpt, speculative_config={"method": "medusa"})


# ---- sampling: rejection sampling keeps the distribution -------------------------------------------


def chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True) if p > 0)


@pytest.mark.parametrize("draft", [0, 2, 4])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=4),
        SamplingParams(temperature=1.3, top_p=0.8),
    ],
)
def test_rejection_sampling_keeps_the_distribution(params: SamplingParams, draft: int) -> None:
    """Over many seeds, the token `verify_draft` returns for a fixed draft is distributed as `sample`'s
    (both against the exact filtered distribution, chi-square at p < 1e-4); draws that never emit a
    token the filter removed."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -3.0]])
    sampler = Sampler()
    n = 6000
    spec_counts, plain_counts = [0] * 6, [0] * 6
    accepted = 0
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        out, ok = sampler.verify_draft(logits, params, [], g, draft)
        spec_counts[int(out.token_ids[0])] += 1
        accepted += ok
        assert ok == (int(out.token_ids[0]) == draft) or not ok
        g = torch.Generator().manual_seed(seed)
        plain_counts[int(sampler.sample(logits, [params], [[]], [g]).token_ids[0])] += 1
    # the exact distribution: what `sample` draws from, estimated over many draws' support, computed here
    from k2serve.engine.sampler import _filter  # the filter both paths share

    probs = _filter(logits.clone(), [params]).softmax(-1)[0].tolist()
    support = sum(p > 0 for p in probs)
    bound = {2: 15.1, 3: 18.4, 4: 21.1, 5: 23.5, 6: 25.7}[support]  # chi-square (support - 1 dof), p = 1e-4
    assert chi_square(spec_counts, probs) < bound, (spec_counts, probs)
    assert chi_square(plain_counts, probs) < bound, (plain_counts, probs)
    assert all(c == 0 for c, p in zip(spec_counts, probs, strict=True) if p == 0)
    assert abs(accepted / n - probs[draft]) < 4 * math.sqrt(max(probs[draft], 1e-3) / n) + 1e-9


def test_sampled_requests_with_speculation_finish_without_leaks(tiny_ckpt: Path) -> None:
    ps = workload()
    params = [
        SamplingParams(temperature=0.8, top_k=20, seed=i, max_tokens=30, ignore_eos=True)
        for i in range(len(ps))
    ]
    spec = make_engine(tiny_ckpt, SPEC)
    got = generate(spec, ps, params)
    assert all(len(t) == 30 for t in got.values())
    assert spec.spec_stats.num_draft_tokens > 0


def test_metrics_count_drafts_and_accepted_tokens(tiny_ckpt: Path) -> None:
    """vLLM's spec_decode counters on the AsyncEngine's registry equal the engine's totals; the
    generation counter counts every emitted token once, however many a step brought."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from k2serve.engine.async_engine import AsyncEngine
    from k2serve.engine.protocol import GenerateRequest

    engine = make_engine(tiny_ckpt, SPEC)
    be = AsyncEngine(engine, "tiny", engine_id="e0")
    be.start()
    try:

        async def main() -> int:
            reqs = [GenerateRequest(f"r{i}", p, greedy(24)) for i, p in enumerate(workload()[:3])]
            counts = await asyncio.gather(*(drain(be, r) for r in reqs))
            return sum(counts)

        generated = asyncio.run(main())
        text = generate_latest(be.metrics.registry).decode()
    finally:
        be.shutdown()
    got = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    st = engine.spec_stats
    assert generated == 3 * 24 == got["vllm:generation_tokens_total"]
    assert st.num_accepted_tokens > 0
    assert got["vllm:spec_decode_num_drafts_total"] == st.num_drafts
    assert got["vllm:spec_decode_num_draft_tokens_total"] == st.num_draft_tokens
    assert got["vllm:spec_decode_num_accepted_tokens_total"] == st.num_accepted_tokens


async def drain(be: Any, req: Any) -> int:
    return sum([len(ev.token_ids) async for ev in await be.generate(req)])


@pytest.mark.slow
def test_cluster_decode_worker_with_speculative_config(tiny_ckpt: Path, tmp_path: Path) -> None:
    """1P1D with --speculative-config on the workers: greedy tokens through the router's gRPC API equal
    the single-process engine's without speculation, and the decode worker accepted drafts."""
    import json

    import grpc
    import httpx
    from cluster_calls import grpc_greedy
    from conftest import SMALL_KV, local_cluster_spec
    from prometheus_client.parser import text_string_to_metric_families

    from k2serve.cluster.local import LocalCluster
    from k2serve.proto import api_pb2_grpc

    ps = workload()
    expected = generate(make_engine(tiny_ckpt, None), ps, [greedy(32) for _ in ps])
    spec = local_cluster_spec(
        tiny_ckpt, tmp_path, engine_args=(*SMALL_KV, "--speculative-config", json.dumps(SPEC))
    )
    with LocalCluster(spec) as cluster:

        async def run() -> list[list[int]]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as ch:
                stub = api_pb2_grpc.K2ServeStub(ch)
                return list(await asyncio.gather(*(grpc_greedy(stub, p, 32) for p in ps)))

        got = asyncio.run(run())
        accepted = 0.0
        for w in cluster.workers():
            if w["role"] == "decode":
                text = httpx.get(w["metrics_url"], timeout=10).text
                for fam in text_string_to_metric_families(text):
                    for s in fam.samples:
                        if s.name == "vllm:spec_decode_num_accepted_tokens_total":
                            accepted += s.value
    assert got == [expected[f"r{i}"] for i in range(len(ps))]
    assert accepted > 0


def test_suffix_proposer_searches_recent_outputs() -> None:
    cfg = SpeculativeConfig("suffix", 3, 4, 1, suffix_decoding_max_cached_requests=2)
    proposer = Proposer(cfg)
    assert proposer.propose("a", [1, 2], [6, 7], 8) == []  # nothing cached, no self-match
    proposer.finish("a", [6, 7])
    proposer.finish("b", [5, 6, 7, 8, 9])
    # "6 7" occurs in a's and b's outputs; only b's continues (8, then 9): probabilities 1/2, 1/2
    assert proposer.propose("c", [1, 2, 6, 7], [], 8) == [8, 9]
    assert proposer.propose("c", [1, 2, 6, 7], [], 1) == [8]  # the caller's limit
    proposer.finish("c", [])
    proposer.finish("d", [1, 1])
    proposer.finish("e", [2, 2])  # the cache keeps the last 2: b's [5, 6, 7, 8, 9] is forgotten
    assert proposer.propose("f", [3, 9, 8], [], 8) == []
    assert proposer.suffix is not None and len(proposer.suffix.global_tree) == 2
    ngram = Proposer(SpeculativeConfig("ngram", 3, 4, 1))
    ngram.finish("a", [5, 6, 7, 8, 9])  # ngram remembers nothing
    assert ngram.propose("b", [1, 2, 6, 7], [], 8) == []
    with pytest.raises(EngineConfigError, match="suffix_decoding_max_cached_requests"):
        SpeculativeConfig("suffix", suffix_decoding_max_cached_requests=-1)


def test_suffix_method_drafts_a_repeated_request_greedy_equal(tiny_ckpt: Path) -> None:
    """An agent-loop pattern: the second request repeats the first one's prompt (a retry), so "suffix"
    drafts the first one's output and nearly every draft is accepted; the tokens equal the plain
    engine's (which "ngram" could not draft: the prompt has no repetition)."""
    p = workload()[3]
    plain = make_engine(tiny_ckpt, None)
    expected = [generate(plain, [p], [greedy(32)])["r0"], generate(plain, [p], [greedy(32)])["r0"]]
    engine = make_engine(tiny_ckpt, SPEC | {"method": "suffix"})
    first = generate(engine, [p], [greedy(32)])["r0"]
    before = engine.spec_stats.num_accepted_tokens
    second = generate(engine, [p], [greedy(32)])["r0"]
    assert [first, second] == expected
    s = engine.spec_stats
    assert s.num_accepted_tokens - before >= 24  # of the second request's 31 tokens after its first


def test_cli_flag_reaches_engine_config_and_workers(capsys: pytest.CaptureFixture[str]) -> None:
    """--speculative-config on serve / decode / up / generate: parsed into EngineConfig, passed on by
    `up` to its workers; bad JSON or a bad field is a usage error (exit 2) naming the field."""
    import json

    from k2serve.cli.parser import build_parser
    from k2serve.cli.settings import engine_args_from_up, engine_config

    text = json.dumps(SPEC)
    for cmd in (["serve", "--preset", "tiny"], ["decode", "--preset", "tiny"]):
        args = build_parser().parse_args([*cmd, "--speculative-config", text])
        assert engine_config(args).speculative_config == SpeculativeConfig("ngram", 4, 4, 1)
    assert engine_config(build_parser().parse_args(["serve", "--preset", "tiny"])).speculative_config is None
    up = build_parser().parse_args(["up", "--preset", "tiny", "--speculative-config", text])
    passed = engine_args_from_up(up)
    assert SpeculativeConfig.parse(
        passed[passed.index("--speculative-config") + 1]
    ) == SpeculativeConfig.parse(SPEC)
    gen = build_parser().parse_args(
        ["generate", "--model", "x", "--prompt", "hi", "--speculative-config", text]
    )
    assert gen.speculative_config == text
    for bad, field in (
        ('{"method": "ngram", "num_speculative_tokens": -2}', "speculative_config.num_speculative_tokens"),
        ('{"method": "eagle3"}', "speculative_config.method"),
        ("{oops", "not valid JSON"),
    ):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["serve", "--preset", "tiny", "--speculative-config", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--speculative-config" in err and field in err


def test_stop_string_inside_a_run(tiny_ckpt: Path) -> None:
    """A stop string completed by an accepted draft: tokens and text equal the plain engine's (the text
    cut before the stop string, no token after the one that completed it)."""
    p = workload()[3]
    plain = make_engine(tiny_ckpt, None)
    ref = run_all_one(plain, p, greedy(24))
    mid = len(ref.text) // 2
    stop = ref.text[mid : mid + 3]
    assert stop and len(ref.text) > 6
    expected = run_all_one(plain, p, greedy(24, stop=[stop]))
    engine = make_engine(tiny_ckpt, SPEC)
    oracle(engine, ref.token_ids)  # every draft right: 5 tokens a step
    got = run_all_one(engine, p, greedy(24, stop=[stop]))
    assert (got.token_ids, got.text, got.finish_reason) == (expected.token_ids, expected.text, "stop")
    assert len(got.token_ids) < 24 and engine.spec_stats.num_accepted_tokens > 0


def run_all_one(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> RequestOutput:
    engine.add_request("one", prompt, params)
    return run_all(engine)["one"]
