"""Conversions between protobuf messages and the engine's Python types (one place, both directions)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from k2serve.engine.sampler import TokenLogprobs
from k2serve.engine.sampling_params import SamplingParams
from k2serve.proto import api_pb2, common_pb2

_FINISH_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "tool_calls": common_pb2.FINISH_REASON_TOOL_CALLS,
    "abort": common_pb2.FINISH_REASON_ABORT,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}


def finish_to_proto(reason: str | None) -> int:
    return _FINISH_TO_PROTO[reason]


def finish_from_proto(value: int) -> str | None:
    return _FINISH_FROM_PROTO.get(value, "abort")


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


def chat_message_to_proto(m: Mapping[str, Any]) -> api_pb2.ChatMessage:
    """An OpenAI chat message as a ChatMessage. Content given as parts becomes the concatenation of
    their texts (what the chat template renders), tool-call arguments given as an object become its
    JSON text, and None or missing fields stay unset."""
    out = api_pb2.ChatMessage(role=m["role"])
    content = m.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content)
    if content is not None:
        out.content = content
    for name in ("reasoning_content", "name", "tool_call_id"):
        if m.get(name) is not None:
            setattr(out, name, m[name])
    for i, c in enumerate(m.get("tool_calls") or ()):
        fn = c["function"]
        arguments = fn.get("arguments", "")
        out.tool_calls.append(
            api_pb2.ToolCall(
                id=c.get("id") or "",
                type=c.get("type") or "function",
                index=i,
                function=api_pb2.FunctionCall(
                    name=fn["name"],
                    arguments=arguments if isinstance(arguments, str) else json.dumps(arguments),
                ),
            )
        )
    return out


def chat_message_from_proto(m: api_pb2.ChatMessage) -> dict[str, Any]:
    """A ChatMessage as an OpenAI chat message: only the fields it has set (tool calls without their
    stream index)."""
    out: dict[str, Any] = {"role": m.role}
    for name in ("content", "reasoning_content", "name", "tool_call_id"):
        if m.HasField(name):
            out[name] = getattr(m, name)
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": c.type or "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in m.tool_calls
        ]
    return out
