"""Scheduling long prompts (issue 15 item 5): a long prompt's chunked prefill never stalls the running
decodes (every step schedules each of them, the prefill chunk takes what is left of the token budget),
and preempting a long sequence and resuming it gives the tokens of an unpreempted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from k2serve.bench.long_context import LONG_BENCH_DIMS
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.scheduler import Scheduler
from k2serve.engine.sequence import Sequence, SequenceStatus
from k2serve.kvcache.block_manager import BlockManager
from k2serve.model.checkpoint import write_checkpoint
from k2serve.model.presets import PRESETS

LONG_PROMPT = 262144 - 64  # K2's full length, less the room for its output
BUDGET = 2048


def simulate_step(sched: Scheduler, chunks: list, next_token: int) -> None:
    """What the engine does after the model ran: positions become computed, finished prompts sample."""
    for c in chunks:
        c.seq.num_computed_tokens += c.num_tokens
        sched.blocks.mark_computed(c.seq.block_table, c.seq.token_ids, c.seq.num_computed_tokens)
    for c in chunks:
        if c.samples:
            c.seq.output_token_ids.append(next_token)
            if len(c.seq.output_token_ids) >= c.seq.params.max_tokens:
                sched.finish(c.seq, "length")


def test_256k_prefill_never_stalls_running_decodes() -> None:
    """Twelve short requests decode (staggered lengths, so some finish and new ones arrive) while a
    262,080-token prompt is prefilled in chunks, 128+ steps: in every step each running decode is
    scheduled for its one token, the long chunk fills exactly what is left of max_num_batched_tokens,
    and the step never exceeds the budget. Requests arriving during the long prefill wait for it."""
    block_size = 16
    cfg = EngineConfig(num_kv_blocks=(LONG_PROMPT + 64 * 1024) // block_size, max_num_batched_tokens=BUDGET)
    sched = Scheduler(cfg, BlockManager(cfg.num_kv_blocks or 0, block_size))
    g = torch.Generator().manual_seed(0)

    def short(i: int, max_tokens: int) -> Sequence:
        prompt = torch.randint(0, 1024, (50 + i,), generator=g).tolist()
        return Sequence(f"s{i}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens))

    for i in range(12):
        sched.add(short(i, 60 + 9 * i))  # the first finish during the long prefill, the last outlive it
    step = 0
    while any(s.num_uncomputed > 1 for s in sched.running) or sched.waiting:
        simulate_step(sched, sched.schedule().chunks, 1)
        step += 1
    long_seq = Sequence(
        "long", torch.randint(0, 1024, (LONG_PROMPT,), generator=g).tolist(), SamplingParams()
    )
    long_seq.params = SamplingParams(temperature=0.0, max_tokens=4)
    sched.add(long_seq)
    long_steps = decode_steps = 0
    late = 0
    while not long_seq.output_token_ids:  # until its prompt is computed and it samples
        decoding = [s for s in sched.running if s is not long_seq and s.num_uncomputed == 1]
        out = sched.schedule()
        assert not out.preempted
        by_seq = {c.seq.request_id: c for c in out.chunks}
        for s in decoding:
            assert s.request_id in by_seq, f"step {step}: running decode {s.request_id} was not scheduled"
            assert by_seq[s.request_id].num_tokens == 1
        assert out.num_tokens <= BUDGET
        c = by_seq["long"]
        assert c.start == long_seq.num_computed_tokens
        assert c.num_tokens == min(long_seq.num_uncomputed, BUDGET - len(decoding)), f"step {step}"
        decode_steps += len(decoding)
        long_steps += 1
        if long_steps % 16 == 0:  # arrivals during the long prefill: queued behind it
            sched.add(short(100 + late, 8))
            late += 1
        simulate_step(sched, out.chunks, 1)
        step += 1
    assert long_steps >= LONG_PROMPT // BUDGET
    assert decode_steps > 12 * 20  # decodes ran beside most of the prefill
    assert long_seq.status is SequenceStatus.RUNNING and len(long_seq.output_token_ids) == 1
    sched.schedule()  # the late arrivals join (at the latest) now, beside the long sequence's decode
    assert {f"s{100 + i}" for i in range(late)} <= {s.request_id for s in sched.running}


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `long` preset (K2's 262,144 YaRN positions) cut to 2 layers (dense + MoE) and hidden 64, as
    tests/test_long_context.py and `k2serve bench long-context` use it: fp32 weights."""
    config = PRESETS["long"] | LONG_BENCH_DIMS
    return write_checkpoint(tmp_path_factory.mktemp("long"), config, seed=0, dtype=torch.float32)


def make_engine(ckpt: Path, **kw: int) -> LLMEngine:
    cfg = EngineConfig(**({"num_kv_blocks": 512, "block_size": 16, "max_num_batched_tokens": 256} | kw))
    return LLMEngine.from_pretrained(ckpt, torch.float32, cfg)


def run_all(engine: LLMEngine, trace: list[list[str]] | None = None) -> dict[str, list[int]]:
    """Runs to completion; `trace` gets, per step, the requests that received a token."""
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        step = engine.step()
        if trace is not None:
            trace.append([o.request_id for o in step])
        out |= {o.request_id: o.token_ids for o in step if o.finished}
    return out


def long_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def test_long_prompt_beside_running_decodes_on_long_preset(long_ckpt: Path) -> None:
    """A 3,000-token prompt prefilled in chunks of <= 256 beside four running decodes: each decode
    gets a token in every step until it finishes (none is stalled by the prefill), and every request's
    tokens equal running it alone."""
    shorts = {f"d{i}": long_prompt(20 + 7 * i, seed=i) for i in range(4)}
    prompts = shorts | {"long": long_prompt(3000, seed=99)}
    expected = {}
    for name, p in prompts.items():
        alone = make_engine(long_ckpt)
        alone.add_request(name, p, GREEDY)
        expected |= run_all(alone)

    engine = make_engine(long_ckpt)
    for name, p in shorts.items():
        engine.add_request(name, p, GREEDY)
    engine.step()  # the short prompts prefill together; from now on they decode
    engine.add_request("long", prompts["long"], GREEDY)
    trace: list[list[str]] = []
    got = run_all(engine, trace)
    assert got == expected
    # The long prompt needs >= 3000 / 252 steps of chunks; the decodes (24 tokens, one already out)
    # run through all of them, one token per step each, never skipped.
    first_long = next(i for i, ids in enumerate(trace) if "long" in ids)
    assert first_long >= 3000 // 256
    for name in shorts:
        steps = [i for i, ids in enumerate(trace) if name in ids]
        assert steps == list(range(GREEDY.max_tokens - 1)), name
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_preempted_long_sequence_resumes_with_identical_tokens(long_ckpt: Path) -> None:
    """A 2,000-token prompt (125 blocks of 16) beside four decodes with long outputs in a pool of 140
    blocks (5 free once it is admitted): the decodes' growth preempts the long sequence (the newest), it waits, is readmitted and
    recomputed (its cached prefix blocks reused where they survived) and finishes with the greedy
    tokens of an unpreempted run; so do the decodes."""
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    shorts = {f"d{i}": long_prompt(30 + i, seed=10 + i) for i in range(4)}
    long_p = long_prompt(2000, seed=7)
    roomy = make_engine(long_ckpt)
    for name, p in shorts.items():
        roomy.add_request(name, p, params)
    roomy.step()
    roomy.add_request("long", long_p, GREEDY)
    expected = run_all(roomy)
    assert roomy.scheduler.num_preemptions == 0

    tight = make_engine(long_ckpt, num_kv_blocks=140)
    for name, p in shorts.items():
        tight.add_request(name, p, params)
    tight.step()
    tight.add_request("long", long_p, GREEDY)
    long_seq = tight.seqs["long"]
    got = run_all(tight)
    assert long_seq.num_preemptions > 0
    assert got == expected
    assert tight.blocks.num_free_blocks == tight.blocks.num_blocks
    tight.blocks.check_invariants([])
