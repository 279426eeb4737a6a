"""Conversions between protobuf messages and the engine's Python types (one place, both directions):
sampling parameters and token log-probabilities. Chat messages and finish reasons, which clients
convert too, live in `k2serve.proto.messages`."""

from __future__ import annotations

from k2serve.engine.sampler import TokenLogprobs
from k2serve.engine.sampling_params import SamplingParams
from k2serve.proto import common_pb2


def sampling_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    m = common_pb2.SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        max_tokens=p.max_tokens,
        min_tokens=p.min_tokens,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
    )
    if p.seed is not None:
        m.seed = p.seed
    if p.logprobs is not None:
        m.logprobs = p.logprobs
    return m


def sampling_from_proto(m: common_pb2.SamplingParams, default_max_tokens: int = 16) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults; raises SamplingParamsError naming a bad field."""
    kw: dict[str, object] = {}
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "min_tokens",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
    ):
        if m.HasField(name):
            kw[name] = getattr(m, name)
    kw["max_tokens"] = m.max_tokens if m.HasField("max_tokens") else default_max_tokens
    return SamplingParams(
        stop=list(m.stop),
        stop_token_ids=list(m.stop_token_ids),
        ignore_eos=m.ignore_eos,
        **kw,  # type: ignore[arg-type]
    )


def logprob_to_proto(lp: TokenLogprobs) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def logprob_from_proto(m: common_pb2.TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(m.token_id, m.logprob, [(t.token_id, t.logprob) for t in m.top])
