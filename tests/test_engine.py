"""The single-node engine: continuous batching, prefix caching, preemption, stops, validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import run_all

from k2serve.engine.config import EngineConfig
from k2serve.engine.llm import LLM
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.sequence import RequestError
from k2serve.model.loader import load_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def make_engine(ckpt: Path, **kw: Any) -> LLMEngine:
    cfg = EngineConfig(**({"num_kv_blocks": 512, "block_size": 8, "max_num_batched_tokens": 96} | kw))
    return LLMEngine.from_pretrained(ckpt, torch.float32, cfg)


def assert_no_leak(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    engine.blocks.check_invariants([])


def prompts(n: int, seed: int, lo: int = 2, hi: int = 70, vocab: int = 1024) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lens]


def test_continuous_batching_equals_one_at_a_time(tiny_ckpt: Path) -> None:
    ps = prompts(32, seed=1)
    params = [SamplingParams(temperature=0.0, max_tokens=8 + i % 17, ignore_eos=True) for i in range(32)]
    solo = make_engine(tiny_ckpt)
    expected = {}
    for i, (p, sp) in enumerate(zip(ps, params, strict=True)):
        solo.add_request(f"r{i}", p, sp)
        expected.update(run_all(solo))
    assert_no_leak(solo)

    batched = make_engine(tiny_ckpt, max_num_batched_tokens=64)  # forces chunked prefill mixed with decodes
    got: dict[str, list[int]] = {}
    pending = list(range(32))
    step = 0
    while pending or batched.has_unfinished_requests():
        for _ in range(3 if step % 2 else 1):  # requests arrive at different steps
            if pending:
                i = pending.pop(0)
                batched.add_request(f"r{i}", ps[i], params[i])
        for o in batched.step():
            if o.finished:
                got[o.request_id] = o.token_ids
        step += 1
    assert got == expected
    assert_no_leak(batched)


def test_engine_matches_reference_model_greedy(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt, torch.float32)
    engine = make_engine(tiny_ckpt)
    ps = prompts(4, seed=2)
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, GREEDY)
    got = run_all(engine)
    for i, p in enumerate(ps):
        ids = torch.tensor([p])
        for _ in range(GREEDY.max_tokens):
            ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
        assert got[str(i)] == ids[0, len(p) :].tolist()
    assert_no_leak(engine)


def test_engine_matches_transformers_generate(tiny_ckpt: Path) -> None:
    from k2serve.config import ModelConfig

    cfg = ModelConfig.from_file(tiny_ckpt)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
        tiny_ckpt, config=transformers.DeepseekV3Config(**cfg.to_hf_dict()), dtype=torch.float32
    ).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.max_length = None
    engine = make_engine(tiny_ckpt)
    ps = prompts(3, seed=3, lo=5, hi=30)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, params)
    got = run_all(engine)
    for i, p in enumerate(ps):
        with torch.inference_mode():
            ids = torch.tensor([p])
            ref = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=32,
                do_sample=False,
                pad_token_id=cfg.pad_token_id,
            )
        assert got[str(i)] == ref[0, len(p) :].tolist()


def test_prefix_cache_hit_is_identical_and_skips_compute(tiny_ckpt: Path) -> None:
    engine = make_engine(tiny_ckpt)
    shared = prompts(1, seed=4, lo=40, hi=41)[0]  # 40 tokens = 5 full blocks of 8
    a, b = shared + [1, 2, 3], shared + [4, 5]
    cold = make_engine(tiny_ckpt, enable_prefix_caching=False)
    cold.add_request("b", b, GREEDY)
    expected_b = run_all(cold)["b"]

    engine.add_request("a", a, GREEDY)
    run_all(engine)
    before = engine.num_computed_tokens_total
    engine.add_request("b", b, GREEDY)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert outs[0].token_ids == expected_b
    assert outs[0].num_cached_tokens == 40
    # Only the uncached prompt tokens and the decode steps were computed.
    assert engine.num_computed_tokens_total - before == (len(b) - 40) + (GREEDY.max_tokens - 1)
    assert_no_leak(engine)


def test_preemption_and_resume_give_identical_tokens(tiny_ckpt: Path) -> None:
    ps = prompts(6, seed=5, lo=20, hi=40)
    params = SamplingParams(temperature=0.8, top_k=50, seed=7, max_tokens=40, ignore_eos=True)
    roomy = make_engine(tiny_ckpt)
    for i, p in enumerate(ps):
        roomy.add_request(str(i), p, params)
    expected = run_all(roomy)
    assert roomy.scheduler.num_preemptions == 0
    tight = make_engine(tiny_ckpt, num_kv_blocks=24)  # 192 slots for ~6 x 70 tokens: must preempt
    for i, p in enumerate(ps):
        tight.add_request(str(i), p, params)
    got = run_all(tight)
    assert tight.scheduler.num_preemptions > 0
    assert got == expected
    assert_no_leak(tight)


def test_stops_and_abort(tiny_ckpt: Path) -> None:
    engine = make_engine(tiny_ckpt)
    p = prompts(1, seed=6)[0]
    engine.add_request("free", p, GREEDY)
    free_run = run_all(engine)["free"]
    stop_tok = free_run[5]
    engine.add_request(
        "stop-id",
        p,
        SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_tok], ignore_eos=True),
    )
    engine.add_request("eos", p, SamplingParams(temperature=0.0, max_tokens=24))
    engine.eos_token_ids = [free_run[3]]
    engine.add_request("min", p, SamplingParams(temperature=0.0, max_tokens=24, min_tokens=10))
    engine.add_request("abort", p, GREEDY)
    engine.step()
    assert engine.abort_request("abort")
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs["stop-id"].token_ids[-1] == stop_tok and outs["stop-id"].finish_reason == "stop"
    assert outs["stop-id"].token_ids == free_run[: free_run.index(stop_tok) + 1]
    assert outs["eos"].token_ids == free_run[: free_run.index(free_run[3]) + 1]
    assert len(outs["min"].token_ids) >= 10
    assert free_run[3] not in outs["min"].token_ids[:9]
    assert "abort" not in outs
    assert_no_leak(engine)


def test_stop_strings_cut_the_text(tiny_ckpt: Path) -> None:
    llm = LLM(tiny_ckpt, engine_config=EngineConfig(num_kv_blocks=256, block_size=8))
    p = prompts(1, seed=8)[0]
    full = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    assert len(full.text) > 10
    stop = full.text[6:9]
    first = full.text.find(stop)
    cut = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:first]


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([5, 99999], GREEDY, "99999 is outside the vocabulary"),
        ([], GREEDY, "empty"),
        # the context is the pool's 4096 positions (512 blocks of 8): fewer than the model's own
        ([1, 2, 3], SamplingParams(max_tokens=9000), "context length is 4096"),
        ([1, 2, 3], SamplingParams(stop_token_ids=[5000]), "stop_token_ids"),
        ([1, 2, 3], SamplingParams(logprobs=5000), "logprobs=5000 is too large: at most 1280"),
        ([1, 2, 3], SamplingParams(top_k=100000), "top_k=100000"),
    ],
)
def test_bad_requests_are_refused_before_work(
    tiny_ckpt: Path, prompt: list[int], params: SamplingParams, message: str
) -> None:
    engine = make_engine(tiny_ckpt)
    engine.add_request("good", [1, 2, 3, 4], GREEDY)
    with pytest.raises(RequestError, match=message):
        engine.add_request("bad", prompt, params)
    assert run_all(engine)["good"]  # the good request is undisturbed
    assert engine.num_computed_tokens_total == 4 + GREEDY.max_tokens - 1
    assert_no_leak(engine)


def test_invalid_sampling_params_name_the_field() -> None:
    from k2serve.engine.sampling_params import SamplingParamsError

    with pytest.raises(SamplingParamsError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(SamplingParamsError, match="temperature"):
        SamplingParams(temperature=-1)


def test_seeded_sampling_is_reproducible(tiny_ckpt: Path) -> None:
    llm = LLM(tiny_ckpt, engine_config=EngineConfig(num_kv_blocks=256, block_size=8))
    ps = prompts(3, seed=9)
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=16, ignore_eos=True)
    a = llm.generate(ps, sp)
    b = llm.generate(ps[:1], sp)
    assert a[0].token_ids == b[0].token_ids
    assert (
        a[0].token_ids
        != llm.generate(ps[:1], SamplingParams(temperature=1.0, seed=124, max_tokens=16, ignore_eos=True))[
            0
        ].token_ids
    )


def test_offline_api_text_prompt_and_timing(tiny_ckpt: Path) -> None:
    import k2serve  # the package's own exports

    llm = k2serve.LLM(tiny_ckpt, dtype="float32", engine_config=EngineConfig(num_kv_blocks=256, block_size=8))
    out = llm.generate("Hello, K2!", k2serve.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("Hello, K2!")
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.metrics.ttft > 0 and out.metrics.tpot > 0


SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_disaggregated_handoff_in_process(tiny_ckpt: Path, params: SamplingParams) -> None:
    """Prefill engine streams each layer's latent via kv_sink; a second engine reserves blocks for it
    (reserve_kv), receives each layer into them (KVReservation.write, or in place through rows()) and
    continues: the tokens equal one engine's, seeded sampling included (the decode side skips the
    draw the prefill side made for the first token)."""
    ps = prompts(5, seed=11, lo=10, hi=60)
    colocated = make_engine(tiny_ckpt)
    for i, p in enumerate(ps):
        colocated.add_request(str(i), p, params)
    expected = run_all(colocated)

    prefill = make_engine(tiny_ckpt, max_num_batched_tokens=32)  # chunked: the sink fires on the last chunk
    decode = make_engine(tiny_ckpt)
    received: dict[str, dict[int, torch.Tensor]] = {}
    for i, p in enumerate(ps):
        received[str(i)] = {}
        prefill.add_request(
            str(i),
            p,
            dataclasses.replace(params, max_tokens=1),
            kv_sink=lambda layer, kv, rid=str(i): received[rid].__setitem__(layer, kv),
        )
    first: dict[str, int] = {}
    while prefill.has_unfinished_requests():
        for o in prefill.step():
            if o.finished:
                first[o.request_id] = o.token_ids[0]
    assert_no_leak(prefill)  # the prefill side keeps nothing referenced (cached prefixes stay evictable)
    geometry = decode.kv_geometry
    mc = decode.model.config
    assert geometry == prefill.kv_geometry
    assert (geometry.num_layers, geometry.kv_dim, geometry.dtype) == (
        mc.num_hidden_layers,
        mc.kv_cache_dim,
        torch.float32,
    )
    assert geometry.bytes_per_token == mc.num_hidden_layers * mc.kv_cache_dim * 4
    for i, p in enumerate(ps):
        rid = str(i)
        assert sorted(received[rid]) == list(range(geometry.num_layers))
        assert received[rid][0].shape == (len(p), geometry.kv_dim)
        reservation = decode.reserve_kv(len(p))
        assert len(reservation.block_table) == -(-len(p) // geometry.block_size)
        for layer, kv in received[rid].items():
            if i % 2 and reservation.contiguous:  # in place, as the torch transfer backend receives
                reservation.rows(layer).copy_(kv)
            else:
                reservation.write(layer, kv)
        assert decode.add_prefilled_request(rid, p, first[rid], params, reservation.block_table) is None
    assert run_all(decode) == expected
    assert_no_leak(decode)
    unused = decode.reserve_kv(40)
    assert decode.blocks.num_free_blocks == decode.blocks.num_blocks - 5
    decode.free_kv(unused.block_table)
    assert_no_leak(decode)


def test_prefilled_request_ended_by_its_first_token_flushes_the_decoder(tiny_ckpt: Path) -> None:
    """max_tokens=1 and a first token holding only the lead byte of a multi-byte character: the
    request ends in add_prefilled_request, and its text is what the normal finish gives (the held byte
    flushed as U+FFFD, as tokenizer.decode has it), not an empty string."""
    engine = make_engine(tiny_ckpt)
    tok = engine.tokenizer
    lead = next(i for i in range(tok.vocab_size) if tok.id_to_token_bytes(i) == b"\xe4")
    prompt = prompts(1, seed=13, lo=10, hi=20)[0]
    table = engine.blocks.allocate(prompt).block_table
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    out = engine.add_prefilled_request("r", prompt, lead, one, table)
    assert out is not None and out.finished and out.finish_reason == "length"
    assert out.token_ids == [lead]
    assert out.text == out.new_text == tok.decode([lead]) == "\ufffd"
    assert_no_leak(engine)


def test_a_failing_kv_sink_fails_only_its_request(tiny_ckpt: Path) -> None:
    engine = make_engine(tiny_ckpt)
    got: dict[int, torch.Tensor] = {}

    def broken(layer: int, kv: torch.Tensor) -> None:
        raise RuntimeError("the transfer is gone")

    p1, p2 = prompts(2, seed=12, lo=10, hi=40)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    engine.add_request("broken", p1, one, kv_sink=broken)
    engine.add_request("fine", p2, one, kv_sink=got.__setitem__)
    done = run_all(engine)  # the step does not raise
    assert set(done) == {"broken", "fine"}
    assert sorted(got) == list(range(engine.model.config.num_hidden_layers))  # the other sink got every layer
    assert_no_leak(engine)
