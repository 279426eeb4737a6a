"""SamplingParams validation and the batched sampler: greedy exactness, filters, penalties, seeds, statistics."""

from __future__ import annotations

import pytest
import torch

from k2serve.engine.protocol import InvalidRequestError
from k2serve.engine.sampler import Sampler, SamplerError, make_generator, skip_draw, suppress_tokens
from k2serve.engine.sampling_params import SamplingParams, SamplingParamsError
from k2serve.engine.validation import validate_request

SAMPLER = Sampler()


def _sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    outputs: list[list[int]] | None = None,
    allowed_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    outputs = outputs if outputs is not None else [[] for _ in params]
    generators = [make_generator(p) for p in params]
    return SAMPLER.sample(logits, params, outputs, generators, allowed_mask).token_ids


def _seeded_rows(logits_row: torch.Tensor, rows: int, **kwargs: object) -> torch.Tensor:
    """`rows` independent draws from one distribution: one row per seed 0..rows-1."""
    params = [SamplingParams(seed=i, **kwargs) for i in range(rows)]  # type: ignore[arg-type]
    return _sample(logits_row.expand(rows, -1).contiguous(), params)


def _chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability 0"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# ---- SamplingParams -----------------------------------------------------------------------------


def test_defaults_and_normalisation_follow_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1, 1.0, 1.0, 0, 0.0, 16)
    assert p.stop == [] and p.stop_token_ids == [] and p.logprobs is None and p.skip_special_tokens
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(temperature=0).is_greedy and not SamplingParams(temperature=0.1).is_greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 1.1),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("logprobs", -1),
        ("stop_token_ids", [-4]),
        ("stop", [""]),
        ("seed", "abc"),
    ],
)
def test_invalid_params_name_the_field_and_value(field: str, value: object) -> None:
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert err.value.field_name == field
    assert field in str(err.value)


def test_min_tokens_above_max_tokens_is_rejected() -> None:
    with pytest.raises(SamplingParamsError, match=r"min_tokens=20 .* max_tokens \(16\)"):
        SamplingParams(min_tokens=20)


def test_validate_request_names_value_and_limit() -> None:
    p = SamplingParams(max_tokens=100, stop_token_ids=[5, 163_840])
    with pytest.raises(InvalidRequestError, match=r"stop_token_ids: token id 163840 .* \[0, 163840\)") as e:
        validate_request(list(range(10)), p, vocab_size=163_840, max_model_len=4096)
    assert (e.value.param, e.value.value, e.value.limit) == ("stop_token_ids", 163_840, 163_840)
    q = SamplingParams(max_tokens=100)
    validate_request(list(range(10)), q, vocab_size=163_840, max_model_len=110)
    with pytest.raises(InvalidRequestError, match=r"max_tokens=100 is too large: .* at most 99 can") as e:
        validate_request(list(range(10)), q, vocab_size=163_840, max_model_len=109)
    assert (e.value.param, e.value.value, e.value.limit) == ("max_tokens", 100, 109)


def test_skip_draw_advances_a_seeded_row_as_a_sampled_step() -> None:
    """A token sampled in another process from the same seed: skipping its draw here leaves the
    generator where sampling it here would have, so the next token is the same; greedy rows draw nothing."""
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(temperature=0.8, seed=42)
    here = make_generator(p)
    SAMPLER.sample(logits[:1], [p], [[]], [here])
    second_here = SAMPLER.sample(logits[1:], [p], [[]], [here]).token_ids
    elsewhere = make_generator(p)
    skip_draw(p, elsewhere, 64)
    assert torch.equal(SAMPLER.sample(logits[1:], [p], [[]], [elsewhere]).token_ids, second_here)
    greedy = SamplingParams(temperature=0.0, seed=42)
    g = make_generator(greedy)
    skip_draw(greedy, g, 64)
    assert g is not None and torch.equal(g.get_state(), make_generator(greedy).get_state())


# ---- exact cases --------------------------------------------------------------------------------


def test_greedy_topk1_and_tiny_topp_equal_argmax() -> None:
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    expected = logits.argmax(dim=-1)
    for params in (
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=1, temperature=2.0),
        SamplingParams(top_p=1e-6, temperature=2.0),
        SamplingParams(min_p=1.0, seed=3),
    ):
        assert torch.equal(_sample(logits, [params] * 6), expected), params
    # bf16 logits: still exactly the argmax of the given values.
    half = logits.bfloat16()
    assert torch.equal(_sample(half, [SamplingParams(temperature=0)] * 6), half.float().argmax(dim=-1))


def test_penalties_follow_openai_semantics_per_row() -> None:
    logits = torch.tensor([[5.0, 3.5, 3.0, 0.0]])

    def greedy_after(outputs: list[int], **penalty: float) -> int:
        params = [SamplingParams(temperature=0, **penalty), SamplingParams(temperature=0)]  # type: ignore[arg-type]
        return _sample(logits.repeat(2, 1), params, [outputs, outputs]).tolist()

    # frequency: 5 - 2 * f; presence: 5 - p; repetition: 5 / r (logit > 0). The second row has none.
    assert greedy_after([0, 0], frequency_penalty=0.7) == [0, 0]  # 3.6 > 3.5
    assert greedy_after([0, 0], frequency_penalty=1.0) == [1, 0]  # 3.0 < 3.5
    assert greedy_after([0, 0], presence_penalty=1.4) == [0, 0]  # counted once: 3.6
    assert greedy_after([0, 0], presence_penalty=1.6) == [1, 0]
    assert greedy_after([0], repetition_penalty=1.4) == [0, 0]  # 3.57
    assert greedy_after([0], repetition_penalty=1.5) == [1, 0]  # 3.33
    assert greedy_after([2, 2], frequency_penalty=-1.5) == [2, 0]  # negative: encourages repeats (6.0)
    # Repetition on a negative logit multiplies: -1 * 1.5 = -1.5 < -1.2.
    neg = torch.tensor([[-1.0, -1.2]])
    assert _sample(neg, [SamplingParams(temperature=0, repetition_penalty=1.5)], [[0]]).tolist() == [1]
    assert _sample(neg, [SamplingParams(temperature=0, repetition_penalty=1.5)], [[1]]).tolist() == [0]


def test_allowed_mask_and_suppress_tokens() -> None:
    logits = torch.zeros(3, 8)
    logits[:, 2] = 10.0
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, 5:7] = True
    params = [SamplingParams(temperature=0), SamplingParams(seed=1), SamplingParams(top_p=0.5, seed=2)]
    for _ in range(20):
        assert set(_sample(logits, params, allowed_mask=mask).tolist()) <= {5, 6}
    mask[1] = False
    with pytest.raises(SamplerError, match=r"rows \[1\]"):
        _sample(logits, params, allowed_mask=mask)
    suppressed = suppress_tokens(logits.clone(), [0, 2], [2])
    assert _sample(suppressed, [SamplingParams(temperature=0)] * 3).tolist() == [0, 2, 0]


def test_mismatched_inputs_raise() -> None:
    with pytest.raises(SamplerError, match="2 logit rows but 1 params"):
        SAMPLER.sample(torch.zeros(2, 4), [SamplingParams()], [[]], [None])


def test_logprobs_are_raw_log_softmax() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    params = [
        SamplingParams(logprobs=3, temperature=0.5, presence_penalty=2.0, seed=0),
        SamplingParams(),
        SamplingParams(logprobs=0, temperature=0),
    ]
    out = SAMPLER.sample(
        logits, params, [[int(logits[0].argmax())], [], []], [make_generator(p) for p in params]
    )
    assert out.logprobs is not None and out.logprobs[1] is None
    ref = logits.log_softmax(dim=-1)
    first = out.logprobs[0]
    assert first is not None and first.token_id == int(out.token_ids[0])
    assert first.logprob == pytest.approx(float(ref[0, first.token_id]), abs=1e-6)
    values, ids = ref[0].topk(3)
    assert [t for t, _ in first.top] == ids.tolist()
    assert [v for _, v in first.top] == pytest.approx(values.tolist(), abs=1e-6)
    third = out.logprobs[2]
    assert third is not None and third.top == [] and third.token_id == int(logits[2].argmax())
    no_logprobs = SAMPLER.sample(logits, [SamplingParams()] * 3, [[]] * 3, [None] * 3)
    assert no_logprobs.logprobs is None


# ---- seeds --------------------------------------------------------------------------------------


def test_seeded_request_is_independent_of_batch_composition() -> None:
    gen = torch.Generator().manual_seed(42)
    steps = [torch.randn(5, 1000, generator=gen) for _ in range(8)]
    target = SamplingParams(seed=1234, temperature=0.9, top_p=0.95, top_k=50, presence_penalty=0.5)
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(seed=7, top_k=3),
        SamplingParams(temperature=1.3, min_p=0.05),
        SamplingParams(seed=1234, temperature=0.2),
    ]

    def run(params: list[SamplingParams], row: int) -> list[int]:
        generators = [make_generator(p) for p in params]
        outputs: list[list[int]] = [[] for _ in params]
        for step in steps:
            logits = torch.cat([step[1 : 1 + len(params) - 1], step[:1]])  # target's logits at `row`
            logits = torch.roll(logits, shifts=row - (len(params) - 1), dims=0)
            tokens = SAMPLER.sample(logits, params, outputs, generators).token_ids.tolist()
            for out, t in zip(outputs, tokens, strict=True):
                out.append(t)
        return outputs[row]

    alone = run([target], 0)
    assert run([target], 0) == alone
    assert run([*others[:2], target, *others[2:]], 2) == alone
    assert run([target, *others], 0) == alone
    assert len(set(alone)) > 1  # really sampled, not collapsed to greedy


# ---- statistics (fixed seeds: deterministic, not flaky) ----------------------------------------

# Critical chi-square values at p = 0.001: the fixed-seed statistic must fall well inside.
_CHI2_CRIT = {1: 10.83, 2: 13.82, 5: 20.52}
_LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -2.0])


def test_temperature_sampling_matches_softmax() -> None:
    for temperature in (0.7, 1.0, 1.8):
        samples = _seeded_rows(_LOGITS, 8000, temperature=temperature)
        stat = _chi_square(samples, (_LOGITS / temperature).softmax(-1))
        assert stat < _CHI2_CRIT[5], (temperature, stat)
    # A too-cold reference must be rejected by the same test (the check has power).
    samples = _seeded_rows(_LOGITS, 8000, temperature=1.0)
    assert _chi_square(samples, (_LOGITS / 0.8).softmax(-1)) > _CHI2_CRIT[5]


def test_top_k_top_p_min_p_renormalise_what_they_keep() -> None:
    probs = _LOGITS.softmax(-1)  # [0.55, 0.20, 0.12, 0.07, 0.04, 0.01]

    def renormalised(keep: int) -> torch.Tensor:
        p = probs.clone()
        p[keep:] = 0
        return p / p.sum()

    cases = [
        ({"top_k": 3}, 3),
        ({"top_p": 0.8}, 3),  # mass before token 2 is 0.75 < 0.8, before token 3 is 0.87
        ({"min_p": 0.2}, 3),  # 0.2 * 0.55 = 0.11 keeps 0.55, 0.20, 0.12
        ({"top_k": 4, "top_p": 0.7}, 2),
    ]
    for kwargs, keep in cases:
        samples = _seeded_rows(_LOGITS, 6000, **kwargs)
        assert int(samples.max()) < keep, kwargs
        assert _chi_square(samples, renormalised(keep)) < _CHI2_CRIT[keep - 1], kwargs
