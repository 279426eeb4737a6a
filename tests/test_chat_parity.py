"""HTTP chat (/v1/chat/completions) and gRPC chat (K2Serve.Chat) take one path (`k2serve.chat.request`):
over the same scripted backend, the same request gives the backend the same prompt ids and grammar
spec, and a bad request gets the same error (HTTP 400 naming the field, gRPC INVALID_ARGUMENT with the
same message); a renderer failure that is not the request's fault is HTTP 500 and gRPC INTERNAL.

Each point below was a difference before the two front doors shared the path: gRPC did not check that a
named tool exists, preferred a forced tool over response_format without a word, sent `developer` as
a role of its own, and turned every renderer exception into INVALID_ARGUMENT."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import ScriptedBackend, grpc_server_in_thread

from k2serve.api.openai_app import build_app
from k2serve.chat.bpe_train import write_tokenizer
from k2serve.chat.prompt import PromptEncoder
from k2serve.chat.tokenizer import KimiTokenizer, load_tokenizer
from k2serve.proto import api_pb2, api_pb2_grpc
from k2serve.proto.messages import chat_message_to_proto
from k2serve.router.grpc_api import K2ServeServicer
from k2serve.testing.app_server import serve_in_thread

pytestmark = pytest.mark.timeout(60)

# A checkpoint's own Jinja template: prints each role (so developer -> system shows), refuses "refuse me"
# (jinja's TemplateError: the messages' fault) and fails on "crash me" (a TypeError: the server's fault).
TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.content == 'refuse me' %}{{ raise_exception('this template refuses ' + m.content) }}{% endif %}"
    "{% if m.content == 'crash me' %}{{ m.content + 1 }}{% endif %}"
    "<|im_system|>{{ m.role }}<|im_middle|>{{ m.content }}<|im_end|>"
    "{% endfor %}"
    "{% if tools %}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{% endif %}"
    "<|im_assistant|>assistant<|im_middle|>"
)
OUTPUT = '<think>ok</think>{"city": "Paris"}<|im_end|>'
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "description": "", "parameters": PARAMS}}
]
SCHEMA_FORMAT: dict[str, Any] = {"type": "json_schema", "json_schema": {"name": "w", "schema": PARAMS}}
USER = {"role": "user", "content": "Weather in Paris?"}


@dataclass
class Doors:
    backend: ScriptedBackend
    http: str
    grpc: str


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> KimiTokenizer:
    out: Path = tmp_path_factory.mktemp("tok")
    write_tokenizer(out, 1024)
    tokenizer = load_tokenizer(out)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def doors(tok: KimiTokenizer) -> Iterator[Doors]:
    backend = ScriptedBackend(tok, tok.encode(OUTPUT, allow_special=True))
    servicer = K2ServeServicer(backend)
    with (
        serve_in_thread(build_app(backend)) as url,
        grpc_server_in_thread(lambda s: api_pb2_grpc.add_K2ServeServicer_to_server(servicer, s)) as srv,
    ):
        yield Doors(backend, url, srv.target)


def over_http(doors: Doors, **body: Any) -> tuple[int, dict[str, Any]]:
    r = httpx.post(f"{doors.http}/v1/chat/completions", json={"max_tokens": 30, **body}, timeout=30)
    return r.status_code, r.json()


def over_grpc(
    doors: Doors,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
    response_format: dict[str, Any] | None = None,
    parallel_tool_calls: bool | None = None,
    max_tokens: int = 30,
) -> tuple[grpc.StatusCode, str, list[api_pb2.ChatResponse]]:
    """The same request as K2Serve.Chat (tool_choice and response_format in their proto form)."""
    req = api_pb2.ChatRequest(messages=[chat_message_to_proto(m) for m in messages])
    if parallel_tool_calls is not None:
        req.parallel_tool_calls = parallel_tool_calls
    req.sampling.max_tokens = max_tokens
    for t in tools or []:
        fn = t["function"]
        req.tools.append(
            api_pb2.Tool(type="function", name=fn["name"], description=fn.get("description", ""),
                         parameters=json.dumps(fn.get("parameters", {})))
        )  # fmt: skip
    if isinstance(tool_choice, str):
        req.tool_choice.mode = tool_choice
    elif tool_choice is not None:
        req.tool_choice.function_name = tool_choice["function"]["name"]
    if response_format is not None:
        req.response_format.type = response_format["type"]
        if "json_schema" in response_format:
            req.response_format.name = response_format["json_schema"]["name"]
            req.response_format.json_schema = json.dumps(response_format["json_schema"]["schema"])
    with grpc.insecure_channel(doors.grpc) as channel:
        try:
            chunks = list(api_pb2_grpc.K2ServeStub(channel).Chat(req, timeout=30))
        except grpc.RpcError as e:
            return e.code(), e.details() or "", []  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, "", chunks


def sent_over_both(doors: Doors, **request: Any) -> tuple[Any, Any]:
    """(prompt ids, structured spec) the backend received for the request over HTTP, then over gRPC."""
    seen = []
    status, body = over_http(doors, **{k: v for k, v in request.items() if v is not None})
    assert status == 200, body
    seen.append(doors.backend.requests[-1])
    code, details, _ = over_grpc(doors, **request)
    assert code == grpc.StatusCode.OK, details
    seen.append(doors.backend.requests[-1])
    return [(r.prompt_token_ids, r.structured) for r in seen]


def refused_by_both(doors: Doors, status: int, code: grpc.StatusCode, **request: Any) -> tuple[str, str]:
    """The request is refused over both doors with these codes, and never reaches the backend; returns
    the HTTP error's (message, param) after checking gRPC's details carry the same message."""
    before = len(doors.backend.requests)
    http_status, body = over_http(doors, **{k: v for k, v in request.items() if v is not None})
    grpc_code, details, _ = over_grpc(doors, **request)
    assert (http_status, grpc_code) == (status, code), (body, details)
    assert details == body["error"]["message"]
    assert len(doors.backend.requests) == before
    return body["error"]["message"], body["error"]["param"]


def test_developer_is_sent_as_system(doors: Doors, tok: KimiTokenizer) -> None:
    messages = [{"role": "developer", "content": "Answer in French."}, USER]
    http, grpc_ = sent_over_both(doors, messages=messages)
    assert http == grpc_
    as_system = [{"role": "system", "content": "Answer in French."}, USER]
    assert http[0] == PromptEncoder(tok).encode_chat(as_system, None, TEMPLATE)
    assert "developer" not in tok.decode(http[0])


def test_tools_and_formats_reach_the_backend_alike(doors: Doors) -> None:
    for request in (
        {"tools": TOOLS},
        {"tools": TOOLS, "tool_choice": "required"},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        {"tools": TOOLS, "tool_choice": "none"},
        {"response_format": SCHEMA_FORMAT},
        {"response_format": {"type": "json_object"}},
        {"tools": TOOLS, "response_format": {"type": "json_object"}},  # tool_choice auto: no conflict
    ):
        http, grpc_ = sent_over_both(doors, messages=[USER], **request)
        assert http == grpc_, request
    assert http[1] == {"response_format": {"type": "json_object"}}


def test_a_named_tool_must_be_declared(doors: Doors) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    message, param = refused_by_both(
        doors, 400, grpc.StatusCode.INVALID_ARGUMENT, messages=[USER], tools=TOOLS, tool_choice=choice
    )
    assert (message, param) == ("tool_choice names 'get_time', which is not in tools", "tool_choice")


def test_required_needs_a_tool(doors: Doors) -> None:
    message, param = refused_by_both(
        doors, 400, grpc.StatusCode.INVALID_ARGUMENT, messages=[USER], tool_choice="required"
    )
    assert (message, param) == ('tool_choice "required" needs at least one tool in tools', "tool_choice")


def test_a_forced_tool_excludes_a_json_format(doors: Doors) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        message, param = refused_by_both(
            doors,
            400,
            grpc.StatusCode.INVALID_ARGUMENT,
            messages=[USER],
            tools=TOOLS,
            tool_choice=choice,
            response_format=SCHEMA_FORMAT,
        )
        assert (message, param) == (
            "response_format cannot be combined with a forced tool_choice",
            "response_format",
        )


def test_messages_the_template_refuses_are_the_clients_error(doors: Doors) -> None:
    message, param = refused_by_both(
        doors, 400, grpc.StatusCode.INVALID_ARGUMENT, messages=[{"role": "user", "content": "refuse me"}]
    )
    assert param == "messages"
    assert message == "the messages cannot be rendered: this template refuses refuse me"


def test_a_renderer_failure_is_the_servers_error(doors: Doors) -> None:
    before = len(doors.backend.requests)
    status, body = over_http(doors, messages=[{"role": "user", "content": "crash me"}])
    code, details, _ = over_grpc(doors, [{"role": "user", "content": "crash me"}])
    assert (status, body["error"]["type"]) == (500, "internal_error")
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error: TypeError")
    assert body["error"]["message"] == "internal error: TypeError"
    assert len(doors.backend.requests) == before


def test_unknown_roles_and_modes_are_refused_over_grpc(doors: Doors) -> None:
    """HTTP's schema refuses these before the chat path; gRPC's proto cannot, so the path does."""
    code, details, _ = over_grpc(doors, [{"role": "narrator", "content": "Once upon a time"}])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "messages[0].role 'narrator' is not one of system, developer, user, assistant, tool"
    status, body = over_http(doors, messages=[{"role": "narrator", "content": "Once upon a time"}])
    assert (status, body["error"]["param"]) == (400, "messages[0].role")
    code, details, _ = over_grpc(doors, [USER], TOOLS, "sometimes")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("tool_choice 'sometimes'")


def test_the_reply_is_parsed_alike(doors: Doors) -> None:
    status, body = over_http(doors, messages=[USER])
    assert status == 200
    code, _, chunks = over_grpc(doors, [USER])
    assert code == grpc.StatusCode.OK
    message = body["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("ok", '{"city": "Paris"}')
    assert "".join(c.delta.reasoning_content for c in chunks) == message["reasoning_content"]
    assert "".join(c.delta.content for c in chunks) == message["content"]


TWO_CALLS = (
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    '{"city": "Paris"}<|tool_call_end|><|tool_call_begin|>functions.get_weather:1'
    '<|tool_call_argument_begin|>{"city": "Rome"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
)


@pytest.mark.parametrize("parallel", [None, True, False])
def test_parallel_tool_calls_alike(doors: Doors, tok: KimiTokenizer, parallel: bool | None) -> None:
    """parallel_tool_calls false keeps a turn to one call over both doors: the forced grammar's spec says
    so, and under auto the parser drops the second call of a reply that makes two; unset or true keeps both."""
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        http, grpc_ = sent_over_both(
            doors, messages=[USER], tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel
        )
        assert http == grpc_
        assert http[1].get("parallel_tool_calls", True) is (parallel is not False)
    script = doors.backend.script
    doors.backend.script = tok.encode(TWO_CALLS, allow_special=True)
    try:
        body = {"parallel_tool_calls": parallel} if parallel is not None else {}
        status, reply = over_http(doors, messages=[USER], tools=TOOLS, max_tokens=200, **body)
        code, details, chunks = over_grpc(doors, [USER], TOOLS, parallel_tool_calls=parallel, max_tokens=200)
    finally:
        doors.backend.script = script
    assert status == 200 and code == grpc.StatusCode.OK, details
    http_calls = [(c["id"], c["function"]["arguments"]) for c in reply["choices"][0]["message"]["tool_calls"]]
    streamed: dict[int, tuple[str, str]] = {}  # index -> (id, arguments so far): deltas may split them
    for chunk in chunks:
        for c in chunk.delta.tool_calls:
            call_id, args = streamed.get(c.index, ("", ""))
            streamed[c.index] = (c.id or call_id, args + c.function.arguments)
    grpc_calls = [streamed[i] for i in sorted(streamed)]
    expected = [("functions.get_weather:0", '{"city": "Paris"}')]
    if parallel is not False:
        expected.append(("functions.get_weather:1", '{"city": "Rome"}'))
    assert http_calls == grpc_calls == expected
