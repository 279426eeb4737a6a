"""The public gRPC API's session history in process: `K2ServeServicer` over an in-memory SessionService
(no cluster, no generation). `GetSessionMessages` returns what HTTP's GET /v1/sessions/{id}/messages
returns (`SessionService.messages`), only to the API key that owns the session, with the errors of
the other session calls; `GRPCTransport.session_messages` reads it, so `AgentLoop.resume` works over
gRPC. The full resume (pending tool calls, new turns) runs in tests/test_agent_cluster.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import grpc_server_in_thread

from k2serve.agent import AgentLoop, GRPCTransport, ToolRegistry, TransportError
from k2serve.chat.tokenizer import KimiTokenizer, load_tokenizer
from k2serve.proto import api_pb2, api_pb2_grpc
from k2serve.proto.messages import chat_message_from_proto, chat_message_to_proto
from k2serve.router.grpc_api import K2ServeServicer
from k2serve.sessions.memory import InMemorySessionStore
from k2serve.sessions.service import SessionService

KEY, OTHER_KEY = "key-alice", "key-bob"
SYSTEM = {"role": "system", "content": "You add numbers."}
CALL = {"id": "functions.add:0", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}
TOOL_STEP = [
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "reasoning_content": "use the tool", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "functions.add:0", "name": "add", "content": "5"},
    {"role": "assistant", "content": "2 + 3 = 5."},
]


@dataclass
class SessionsOnlyBackend:
    """What K2ServeServicer reads of a backend outside Generate and Chat."""

    tokenizer: KimiTokenizer
    model_name: str = "tiny"
    max_model_len: int = 256


@dataclass
class Served:
    sessions: SessionService
    target: str
    loop: asyncio.AbstractEventLoop

    def owner_messages(self, session_id: str, key: str = KEY) -> list[dict[str, Any]]:
        """What HTTP's GET /v1/sessions/{id}/messages returns as `data` for this key."""
        return asyncio.run_coroutine_threadsafe(self.sessions.messages(session_id, key), self.loop).result(10)

    def append(self, session_id: str, messages: list[dict[str, Any]]) -> None:
        """Append as HTTP's POST /v1/sessions/{id}/messages does (any JSON messages, unvalidated shape)."""
        coro = self.sessions.append_messages(session_id, KEY, messages)
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)


@pytest.fixture(scope="module")
def served(tiny_ckpt: Path) -> Iterator[Served]:
    sessions = SessionService(InMemorySessionStore())
    servicer = K2ServeServicer(SessionsOnlyBackend(load_tokenizer(tiny_ckpt)), sessions)  # type: ignore[arg-type]
    with grpc_server_in_thread(
        lambda server: api_pb2_grpc.add_K2ServeServicer_to_server(servicer, server)
    ) as srv:
        yield Served(sessions, srv.target, srv.loop)


@pytest.fixture
def stub(served: Served) -> Iterator[api_pb2_grpc.K2ServeStub]:
    with grpc.insecure_channel(served.target) as channel:
        yield api_pb2_grpc.K2ServeStub(channel)


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def create(stub: api_pb2_grpc.K2ServeStub, messages: list[dict[str, Any]]) -> str:
    req = api_pb2.CreateSessionRequest(messages=[chat_message_to_proto(m) for m in messages])
    return stub.CreateSession(req, metadata=auth(KEY), timeout=10).id


def read(stub: api_pb2_grpc.K2ServeStub, session_id: str, key: str = KEY) -> list[dict[str, Any]]:
    req = api_pb2.GetSessionMessagesRequest(session_id=session_id)
    out = stub.GetSessionMessages(req, metadata=auth(key), timeout=10)
    assert out.session_id == session_id
    return [chat_message_from_proto(m) for m in out.messages]


def test_history_is_what_http_returns(served: Served, stub: api_pb2_grpc.K2ServeStub) -> None:
    sid = create(stub, [SYSTEM])
    req = api_pb2.AppendSessionRequest(session_id=sid, messages=[chat_message_to_proto(m) for m in TOOL_STEP])
    assert stub.AppendSession(req, metadata=auth(KEY), timeout=10).tool_step_count == 1
    http = served.owner_messages(sid)
    assert http == [SYSTEM, *TOOL_STEP]
    assert read(stub, sid) == http


def test_messages_beyond_chat_message_are_flattened(served: Served, stub: api_pb2_grpc.K2ServeStub) -> None:
    """HTTP accepts content as text parts and arguments as an object; gRPC sends what the template renders."""
    sid = create(stub, [SYSTEM])
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "Add "}, {"type": "text", "text": "2 and 3."}],
    }
    call = {"id": "functions.add:0", "type": "function", "function": {"name": "add", "arguments": {"a": 2}}}
    served.append(sid, [parts, {"role": "assistant", "content": None, "tool_calls": [call]}])
    assert served.owner_messages(sid)[1:] == [
        parts,
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]
    assert read(stub, sid)[1:] == [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "tool_calls": [{**call, "function": {"name": "add", "arguments": '{"a": 2}'}}]},
    ]


@pytest.mark.parametrize(
    ("session_id", "key", "code"),
    [
        ("own", OTHER_KEY, grpc.StatusCode.NOT_FOUND),  # another key's session does not exist for it
        ("own", None, grpc.StatusCode.NOT_FOUND),  # nor for an anonymous caller
        ("sess_" + "0" * 32, KEY, grpc.StatusCode.NOT_FOUND),
        ("bad id!", KEY, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_foreign_unknown_and_malformed_ids(
    stub: api_pb2_grpc.K2ServeStub, session_id: str, key: str | None, code: grpc.StatusCode
) -> None:
    sid = create(stub, [SYSTEM]) if session_id == "own" else session_id
    req = api_pb2.GetSessionMessagesRequest(session_id=sid)
    with pytest.raises(grpc.RpcError) as e:
        stub.GetSessionMessages(req, metadata=auth(key) if key else (), timeout=10)
    assert e.value.code() == code
    get = stub.GetSession  # the same answer as the session itself gets
    with pytest.raises(grpc.RpcError) as same:
        get(api_pb2.GetSessionRequest(session_id=sid), metadata=auth(key) if key else (), timeout=10)
    assert same.value.code() == code


def test_grpc_transport_reads_and_resumes(served: Served, stub: api_pb2_grpc.K2ServeStub) -> None:
    sid = create(stub, [SYSTEM, *TOOL_STEP])
    transport = GRPCTransport.connect(served.target, KEY, timeout_s=10)
    assert transport.session_messages(sid) == served.owner_messages(sid)
    result = AgentLoop.resume(sid, transport, ToolRegistry())  # ends in a final answer: no turn to run
    assert (result.stop_reason, result.final_answer, result.steps) == ("final", "2 + 3 = 5.", ())
    with pytest.raises(TransportError) as e:
        GRPCTransport.connect(served.target, OTHER_KEY, timeout_s=10).session_messages(sid)
    assert e.value.status == "NOT_FOUND"
