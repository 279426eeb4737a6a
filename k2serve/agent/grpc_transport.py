"""GRPCTransport: the agent's turns over the public gRPC API (`k2serve.v1.K2Serve`, generated stub).

A turn is the server-streaming `Chat` call with `session_id`; the owner of the session is the API key
sent as `authorization: Bearer KEY` metadata. `session_messages` (what `AgentLoop.resume` reads) is
`GetSessionMessages`, the history HTTP's `GET /v1/sessions/{id}/messages` returns.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from k2serve.agent.errors import TransportError
from k2serve.agent.transport import Message, SamplingOptions, Transport, Turn, assistant_message
from k2serve.proto import api_pb2, api_pb2_grpc, common_pb2
from k2serve.proto.messages import chat_message_from_proto, chat_message_to_proto, finish_from_proto

__all__ = ["GRPCTransport"]


def tool_to_proto(t: Mapping[str, Any]) -> api_pb2.Tool:
    fn = t["function"]
    return api_pb2.Tool(
        type=t.get("type", "function"),
        name=fn["name"],
        description=fn.get("description", ""),
        parameters=json.dumps(fn.get("parameters", {})),
    )


def sampling_to_proto(s: SamplingOptions) -> common_pb2.SamplingParams:
    m = common_pb2.SamplingParams(stop=list(s.stop))
    for name in ("temperature", "top_p", "max_tokens", "seed"):
        if (value := getattr(s, name)) is not None:
            setattr(m, name, value)
    if s.logprobs:
        m.logprobs = 0  # the sampled token's logprob, no alternatives
    return m


class GRPCTransport(Transport):
    """Over a `K2ServeStub`; `api_key` (None: anonymous) owns the sessions; `timeout_s` per call."""

    def __init__(
        self, stub: api_pb2_grpc.K2ServeStub, api_key: str | None = None, timeout_s: float = 600.0
    ) -> None:
        self.stub = stub
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    @classmethod
    def connect(cls, target: str, api_key: str | None = None, timeout_s: float = 600.0) -> GRPCTransport:
        """A transport over an insecure channel to `target` ("host:port")."""
        return cls(api_pb2_grpc.K2ServeStub(grpc.insecure_channel(target)), api_key, timeout_s)

    def _call(self, operation: str, fn: Any, request: Any) -> Any:
        try:
            return fn(request, metadata=self.metadata, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise TransportError(operation, e.code().name, e.details() or "") from e

    def create_session(self, messages: Sequence[Message], ttl_seconds: int | None, model: str | None) -> str:
        req = api_pb2.CreateSessionRequest(
            model=model or "", messages=[chat_message_to_proto(m) for m in messages]
        )
        if ttl_seconds is not None:
            req.ttl_seconds = ttl_seconds
        return str(self._call("create session", self.stub.CreateSession, req).id)

    def session_messages(self, session_id: str) -> list[Message]:
        req = api_pb2.GetSessionMessagesRequest(session_id=session_id)
        out = self._call(f"read session {session_id}", self.stub.GetSessionMessages, req)
        return [chat_message_from_proto(m) for m in out.messages]

    def delete_session(self, session_id: str) -> bool:
        req = api_pb2.DeleteSessionRequest(session_id=session_id)
        return bool(self._call(f"delete session {session_id}", self.stub.DeleteSession, req).deleted)

    def chat(
        self,
        session_id: str | None,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]],
        tool_choice: str,
        sampling: SamplingOptions,
        model: str | None,
    ) -> Turn:
        req = api_pb2.ChatRequest(
            model=model or "",
            messages=[chat_message_to_proto(m) for m in messages],
            tools=[tool_to_proto(t) for t in tools],
            sampling=sampling_to_proto(sampling),
        )
        if session_id is not None:
            req.session_id = session_id
        if tools:
            req.tool_choice.mode = tool_choice
        t0 = time.perf_counter()
        ttft, finish, usage = None, None, None
        content: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []

        def consume() -> None:
            nonlocal ttft, finish, usage
            for r in self.stub.Chat(req, metadata=self.metadata, timeout=self.timeout_s):
                d = r.delta
                if ttft is None:  # the server sends one response per token event, from the first token on
                    ttft = time.perf_counter() - t0
                content.append(d.content)
                reasoning.append(d.reasoning_content)
                calls.extend(  # a call arrives whole, once its arguments are complete
                    {
                        "id": c.id,
                        "type": c.type or "function",
                        "function": {"name": c.function.name, "arguments": c.function.arguments},
                    }
                    for c in d.tool_calls
                )
                if r.finish_reason:
                    finish, usage = finish_from_proto(r.finish_reason), r.usage

        operation = f"chat turn of session {session_id}"
        try:
            consume()
        except grpc.RpcError as e:
            raise TransportError(operation, e.code().name, e.details() or "") from e
        latency = time.perf_counter() - t0
        if finish not in ("stop", "length", "tool_calls") or usage is None:
            raise TransportError(operation, None, f"the stream ended with finish reason {finish!r}")
        return Turn(
            message=assistant_message("".join(content), "".join(reasoning), calls),
            finish_reason=finish,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
            ttft_s=ttft if ttft is not None else latency,
            latency_s=latency,
        )
