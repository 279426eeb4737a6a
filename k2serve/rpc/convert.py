"""Conversions between protobuf messages and the engine's Python types (one place, both directions):
sampling parameters (field by field, by name: a SamplingParams field without a proto twin fails the
round-trip tests) and token log-probabilities. Chat messages and finish reasons, which clients convert
too, live in `k2serve.proto.messages`."""

from __future__ import annotations

import dataclasses
from typing import Any

from k2serve.engine.sampler import TokenLogprobs
from k2serve.engine.sampling_params import SamplingParams
from k2serve.proto import common_pb2

_REPEATED_SAMPLING = ("stop", "stop_token_ids")


def sampling_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    """Every field of `p` into the field of the same name (None leaves an optional field unset)."""
    m = common_pb2.SamplingParams()
    for f in dataclasses.fields(p):
        value = getattr(p, f.name)
        if f.name in _REPEATED_SAMPLING:
            getattr(m, f.name).extend(value)
        elif value is not None:
            setattr(m, f.name, value)
    return m


def sampling_from_proto(m: common_pb2.SamplingParams, default_max_tokens: int = 16) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults (max_tokens: `default_max_tokens`); raises
    SamplingParamsError naming a bad field."""
    kw: dict[str, Any] = {"max_tokens": default_max_tokens}
    for f in dataclasses.fields(SamplingParams):
        if f.name in _REPEATED_SAMPLING:
            kw[f.name] = list(getattr(m, f.name))
        elif not m.DESCRIPTOR.fields_by_name[f.name].has_presence or m.HasField(f.name):
            kw[f.name] = getattr(m, f.name)
    return SamplingParams(**kw)


def logprob_to_proto(lp: TokenLogprobs) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def logprob_from_proto(m: common_pb2.TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(m.token_id, m.logprob, [(t.token_id, t.logprob) for t in m.top])
