"""Anthropic's Messages API over a scripted K2 output, with the `anthropic` SDK: thinking, text and
tool_use blocks (plain and streamed, every event type), a tool round trip rendered exactly as the
equivalent chat completion, tool_choice, stop sequences, count_tokens, x-api-key / Bearer auth, and
errors in Anthropic's shape. The real engine behind `k2serve serve` and the cluster: test_api_anthropic_e2e."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from conftest import ScriptedBackend, scripted_backend

from k2serve.api.openai_app import build_app
from k2serve.api.thinking import THINKING_KEY_ENV, ThinkingSigner
from k2serve.testing.app_server import serve_in_thread

pytestmark = pytest.mark.timeout(60)
KEY = "anthropic-test-key"
OUTPUT = (
    "<think>Let me think.</think>Sure, checking.<|tool_calls_section_begin|><|tool_call_begin|>"
    'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
    "<|tool_calls_section_end|><|im_end|>"
)
TOOLS: list[Any] = [
    {
        "name": "get_weather",
        "description": "Weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
ASK: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> ScriptedBackend:
    return scripted_backend(tmp_path_factory, OUTPUT)


@pytest.fixture(scope="module")
def url(backend: ScriptedBackend) -> Iterator[str]:
    with serve_in_thread(build_app(backend, api_key=f"other-key,{KEY}")) as base:
        yield base


@pytest.fixture
def client(url: str, backend: ScriptedBackend) -> anthropic.Anthropic:
    backend.fail_at, backend.delay_s = None, 0.0
    backend.requests.clear()
    backend.aborted.clear()
    return anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=30)


def prompt_text(backend: ScriptedBackend) -> str:
    return backend.tokenizer.decode(backend.requests[-1].prompt_token_ids)


def test_thinking_text_and_tool_use_blocks(client: anthropic.Anthropic, backend: ScriptedBackend) -> None:
    r = client.messages.create(model="scripted", max_tokens=200, messages=ASK, tools=TOOLS)
    assert [b.type for b in r.content] == ["thinking", "text", "tool_use"]
    thinking, text, tool = r.content
    assert thinking.type == "thinking" and thinking.thinking == "Let me think."
    assert text.type == "text" and text.text == "Sure, checking."
    assert tool.type == "tool_use"
    assert (tool.id, tool.name, tool.input) == ("functions.get_weather:0", "get_weather", {"city": "Paris"})
    assert (r.stop_reason, r.stop_sequence, r.role, r.model) == ("tool_use", None, "assistant", "scripted")
    assert r.id.startswith("msg_")
    n_prompt = len(backend.requests[-1].prompt_token_ids)
    assert (r.usage.input_tokens, r.usage.output_tokens) == (n_prompt, len(backend.script))
    assert r.usage.cache_read_input_tokens == 0
    structured = backend.requests[-1].structured  # tool_choice auto: the grammar binds at a tool-call section
    assert structured is not None and structured["tool_choice"] == "auto"
    assert "tool_declare" in prompt_text(backend) and "input_schema" not in prompt_text(backend)


def test_stream_sends_every_event_type_and_the_same_message(client: anthropic.Anthropic) -> None:
    plain = client.messages.create(model="scripted", max_tokens=200, messages=ASK, tools=TOOLS)
    with client.messages.stream(model="scripted", max_tokens=200, messages=ASK, tools=TOOLS) as stream:
        kinds = []
        deltas = set()
        for ev in stream:
            kinds.append(ev.type)
            if ev.type == "content_block_delta":
                deltas.add(ev.delta.type)
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(kinds)
    assert deltas == {"thinking_delta", "signature_delta", "text_delta", "input_json_delta"}
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 3
    assert final.model_dump(exclude={"id"}) == plain.model_dump(exclude={"id"})


def test_stream_frames_raw_events_as_anthropic_does(url: str) -> None:
    body = {"model": "scripted", "max_tokens": 200, "messages": ASK, "tools": TOOLS, "stream": True}
    with httpx.stream("POST", f"{url}/v1/messages", json=body, headers={"x-api-key": KEY}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    frames = [f for f in raw.split("\n\n") if f]
    names = [f.split("\n")[0].removeprefix("event: ") for f in frames]
    assert names[:2] == ["message_start", "ping"]
    for f in frames:  # the event name is repeated as the data's type
        name, data = f.split("\n")
        assert json.loads(data.removeprefix("data: "))["type"] == name.removeprefix("event: ")
    delta = json.loads(frames[names.index("message_delta")].split("\n")[1].removeprefix("data: "))
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] > 0


def test_tool_round_trip_renders_as_the_chat_completion(
    client: anthropic.Anthropic, url: str, backend: ScriptedBackend
) -> None:
    """The turn after a tool call, sent in Anthropic's shape, is the prompt the equivalent OpenAI
    request makes, token for token: thinking round-trips as reasoning, tool_result as the tool turn."""
    first = client.messages.create(model="scripted", max_tokens=200, messages=ASK, tools=TOOLS)
    call = first.content[2]
    assert call.type == "tool_use"
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "18C"}]},
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    client.messages.create(
        model="scripted", max_tokens=200, system="Be brief.", messages=history, tools=TOOLS
    )
    anthropic_prompt = backend.requests[-1].prompt_token_ids
    assert "## Return of functions.get_weather:0\n18C" in prompt_text(backend)
    assert "Let me think." in prompt_text(backend)  # the reasoning of the turn being continued

    oa = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)
    oa.chat.completions.create(
        model="scripted",
        max_tokens=200,
        tools=[
            {
                "type": "function",
                "function": {
                    "name": t["name"],
                    "description": t["description"],
                    "parameters": t["input_schema"],
                },
            }
            for t in TOOLS
        ],
        messages=[
            {"role": "system", "content": "Be brief."},
            *ASK,
            {
                "role": "assistant",
                "content": "Sure, checking.",
                "reasoning_content": "Let me think.",  # type: ignore[typeddict-unknown-key]
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": "18C"},
            {"role": "user", "content": "And tomorrow?"},
        ],
    )
    assert backend.requests[-1].prompt_token_ids == anthropic_prompt


def test_tool_result_errors_are_marked(client: anthropic.Anthropic, backend: ScriptedBackend) -> None:
    history: list[Any] = [
        *ASK,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "no city", "is_error": True}],
        },
    ]
    client.messages.create(model="scripted", max_tokens=200, messages=history, tools=TOOLS)
    assert "## Return of functions.get_weather:0\nError: no city" in prompt_text(backend)  # K2 ids


@pytest.mark.parametrize(
    ("choice", "structured_choice"),
    [
        ({"type": "any"}, "required"),
        ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, None),
    ],
)
def test_tool_choice(
    client: anthropic.Anthropic, backend: ScriptedBackend, choice: Any, structured_choice: Any
) -> None:
    client.messages.create(model="scripted", max_tokens=200, messages=ASK, tools=TOOLS, tool_choice=choice)
    structured = backend.requests[-1].structured
    if structured_choice is None:
        assert structured is None
    else:
        assert structured is not None and structured["tool_choice"] == structured_choice
        assert structured["tools"][0]["function"]["parameters"] == TOOLS[0]["input_schema"]
    assert ("tool_declare" in prompt_text(backend)) == (choice["type"] != "none")


def test_stop_sequence_and_max_tokens(client: anthropic.Anthropic) -> None:
    r = client.messages.create(
        model="scripted", max_tokens=200, messages=ASK, stop_sequences=["xyz", "checking"]
    )
    assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", "checking")
    assert [b.type for b in r.content] == ["thinking", "text"] and r.content[1].text == "Sure, "  # type: ignore[union-attr]
    r = client.messages.create(model="scripted", max_tokens=3, messages=ASK)
    assert (r.stop_reason, r.usage.output_tokens) == ("max_tokens", 3)


def test_no_tools_no_tool_blocks(client: anthropic.Anthropic) -> None:
    r = client.messages.create(model="scripted", max_tokens=200, messages=ASK)
    assert [b.type for b in r.content] == ["thinking", "text"] and r.stop_reason == "end_turn"


def test_count_tokens_is_the_billed_input(client: anthropic.Anthropic, backend: ScriptedBackend) -> None:
    kwargs: dict[str, Any] = {
        "model": "scripted",
        "messages": ASK,
        "tools": TOOLS,
        "system": [{"type": "text", "text": "Be brief."}],
    }
    counted = client.messages.count_tokens(**kwargs)
    r = client.messages.create(max_tokens=50, **kwargs)
    assert counted.input_tokens == len(backend.requests[-1].prompt_token_ids)
    assert counted.input_tokens == r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0)
    assert counted.input_tokens != client.messages.count_tokens(model="scripted", messages=ASK).input_tokens


def test_auth_x_api_key_and_bearer(url: str) -> None:
    ok = anthropic.Anthropic(base_url=url, auth_token=KEY, max_retries=0)  # Authorization: Bearer
    assert ok.messages.count_tokens(model="scripted", messages=ASK).input_tokens > 0
    for bad in (
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0),
        anthropic.Anthropic(base_url=url, auth_token="wrong", max_retries=0),
    ):
        with pytest.raises(anthropic.AuthenticationError) as e:
            bad.messages.create(model="scripted", max_tokens=5, messages=ASK)
        assert e.value.status_code == 401
        assert e.value.body == {
            "type": "error",
            "error": {"type": "authentication_error", "message": e.value.body["error"]["message"]},
        }  # type: ignore[index]
    r = httpx.post(f"{url}/v1/messages", json={"model": "scripted", "max_tokens": 5, "messages": ASK})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "scripted", "messages": ASK}, 400, "max_tokens"),
        ({"model": "scripted", "max_tokens": 5, "messages": []}, 400, "messages"),
        (
            {"model": "scripted", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
            400,
            "messages.0.role",
        ),
        (
            {
                "model": "scripted",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
            },
            400,
            "image content blocks are not supported",
        ),
        (
            {
                "model": "scripted",
                "max_tokens": 5,
                "messages": [
                    {"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}
                ],
            },
            400,
            "messages.0.content.0",
        ),
        (
            {
                "model": "scripted",
                "max_tokens": 5,
                "messages": ASK,
                "tools": TOOLS,
                "tool_choice": {"type": "tool", "name": "nope"},
            },
            400,
            "nope",
        ),
        (
            {"model": "scripted", "max_tokens": 5, "messages": ASK, "tool_choice": {"type": "any"}},
            400,
            "tool",
        ),
        (
            {
                "model": "scripted",
                "max_tokens": 5,
                "messages": ASK,
                "tools": [{"type": "web_search_20250305", "name": "w", "input_schema": {}}],
            },
            400,
            "server tools",
        ),
        ({"model": "scripted", "max_tokens": 5, "messages": ASK, "temperature": -1}, 400, "temperature"),
        ({"model": "scripted", "max_tokens": 100000, "messages": ASK}, 400, "max_tokens"),
        (
            {
                "model": "scripted",
                "max_tokens": 5,
                "messages": [*ASK, {"role": "assistant", "content": "Sure"}],
            },
            400,
            "prefill",
        ),
        ({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": ASK}, 404, "claude-sonnet-4-5"),
    ],
)
def test_errors_in_anthropic_shape(url: str, body: dict[str, Any], status: int, needle: str) -> None:
    r = httpx.post(
        f"{url}/v1/messages", json=body, headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    )
    assert r.status_code == status, r.text
    err = r.json()
    assert err["type"] == "error" and set(err["error"]) == {"type", "message"}
    assert err["error"]["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]
    assert needle in err["error"]["message"]


def test_not_json_is_a_400(url: str) -> None:
    r = httpx.post(f"{url}/v1/messages", content=b"{oops", headers={"x-api-key": KEY})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_sdk_raises_typed_errors(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(
            model="scripted",
            max_tokens=5,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}],
                }
            ],
        )
    assert "image" in e.value.message
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-opus-4-1", max_tokens=5, messages=ASK)


def test_a_failure_mid_stream_is_an_error_event(
    client: anthropic.Anthropic, backend: ScriptedBackend
) -> None:
    backend.fail_at = 4
    with (
        pytest.raises(anthropic.APIStatusError) as e,
        client.messages.stream(model="scripted", max_tokens=200, messages=ASK) as stream,
    ):
        for _ in stream:
            pass
    assert e.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert "scripted failure" in e.value.body["error"]["message"]  # type: ignore[index]


def test_a_claude_code_shaped_request(
    url: str, client: anthropic.Anthropic, backend: ScriptedBackend
) -> None:
    """The fields Claude Code sends besides the basics (cache_control marks, metadata, thinking,
    anthropic-beta, system blocks) are accepted and change nothing in the prompt."""
    body: dict[str, Any] = {
        "model": "scripted",
        "max_tokens": 1000,
        "stream": True,
        "system": [
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": " Be careful."},
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather in Paris?", "cache_control": {"type": "ephemeral"}}
                ],
            }
        ],
        "tools": [{**TOOLS[0], "cache_control": {"type": "ephemeral"}}],
        "metadata": {"user_id": "user_abc"},
        "thinking": {"type": "enabled", "budget_tokens": 500},
        "temperature": 1,
    }
    headers = {
        "x-api-key": KEY,
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "interleaved-thinking-2025-05-14",
    }
    with httpx.stream("POST", f"{url}/v1/messages", json=body, headers=headers) as r:
        assert r.status_code == 200, r.read()
        assert "message_stop" in r.read().decode()
    prompt = prompt_text(backend)
    assert "You are Claude Code. Be careful." in prompt and "cache_control" not in prompt


def turn_after(first: Any, thinking: dict[str, Any] | None = None) -> list[Any]:
    """The next turn's messages: ASK, `first`'s blocks as the assistant turn (its thinking block replaced
    by `thinking` when given) and the tool result."""
    blocks = [b.model_dump() for b in first.content]
    if thinking is not None:
        blocks[0] = thinking
    result = {"type": "tool_result", "tool_use_id": first.content[2].id, "content": "18C"}
    return [*ASK, {"role": "assistant", "content": blocks}, {"role": "user", "content": [result]}]


def test_thinking_is_signed_and_tampering_is_refused(client: anthropic.Anthropic, url: str) -> None:
    first = client.messages.create(model="scripted", max_tokens=200, messages=ASK, tools=TOOLS)
    thinking = first.content[0]
    assert thinking.type == "thinking" and len(base64.b64decode(thinking.signature, validate=True)) == 32
    with client.messages.stream(model="scripted", max_tokens=200, messages=ASK, tools=TOOLS) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].type == "thinking" and streamed.content[0].signature == thinking.signature
    body = {"model": "scripted", "max_tokens": 200, "messages": ASK, "tools": TOOLS, "stream": True}
    with httpx.stream("POST", f"{url}/v1/messages", json=body, headers={"x-api-key": KEY}) as r:
        frames = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    on_block0 = [(f["type"], f.get("delta", {}).get("type")) for f in frames if f.get("index") == 0]
    assert on_block0[-2:] == [("content_block_delta", "signature_delta"), ("content_block_stop", None)]
    assert frames[0]["type"] == "message_start"
    start = next(f for f in frames if f["type"] == "content_block_start" and f["index"] == 0)
    assert start["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}

    client.messages.create(model="scripted", max_tokens=200, messages=turn_after(first), tools=TOOLS)
    unsigned = {"type": "thinking", "thinking": "Let me think."}  # a client that never saw a signature
    client.messages.create(
        model="scripted", max_tokens=200, messages=turn_after(first, unsigned), tools=TOOLS
    )
    for forged in (
        {"type": "thinking", "thinking": "Let me think harder.", "signature": thinking.signature},
        {"type": "thinking", "thinking": "Let me think.", "signature": base64.b64encode(bytes(32)).decode()},
        {"type": "thinking", "thinking": "Let me think.", "signature": "not base64 at all"},
    ):
        with pytest.raises(anthropic.BadRequestError) as e:
            client.messages.create(
                model="scripted", max_tokens=200, messages=turn_after(first, forged), tools=TOOLS
            )
        assert e.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        assert "messages.1.content.0.signature: invalid signature" in e.value.message
        with pytest.raises(anthropic.BadRequestError):  # count_tokens reads the same messages
            client.messages.count_tokens(model="scripted", messages=turn_after(first, forged), tools=TOOLS)


def test_signatures_follow_the_configured_key(
    backend: ScriptedBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas configured with one $K2SERVE_THINKING_KEY accept each other's thinking blocks; a server
    with another key refuses them. The signature is HMAC-SHA256 of the thinking text under the key."""
    monkeypatch.setenv(THINKING_KEY_ENV, "replica-shared-key")
    with (
        serve_in_thread(build_app(backend, api_key=KEY)) as one,
        serve_in_thread(build_app(backend, api_key=KEY)) as two,
    ):
        monkeypatch.setenv(THINKING_KEY_ENV, "another-key")
        with serve_in_thread(build_app(backend, api_key=KEY)) as other:
            clients = [
                anthropic.Anthropic(base_url=u, api_key=KEY, max_retries=0, timeout=30)
                for u in (one, two, other)
            ]
            first = clients[0].messages.create(model="scripted", max_tokens=200, messages=ASK, tools=TOOLS)
            digest = hmac.new(
                b"replica-shared-key", b"k2serve thinking signature v1\x00Let me think.", hashlib.sha256
            ).digest()
            assert first.content[0].signature == base64.b64encode(digest).decode()  # type: ignore[union-attr]
            clients[1].messages.create(
                model="scripted", max_tokens=200, messages=turn_after(first), tools=TOOLS
            )
            with pytest.raises(anthropic.BadRequestError, match="invalid signature"):
                clients[2].messages.create(
                    model="scripted", max_tokens=200, messages=turn_after(first), tools=TOOLS
                )


def test_the_signing_key_is_configured_then_shared_then_random() -> None:
    """$K2SERVE_THINKING_KEY wins; a router without it uses its cluster token (every replica holds it);
    without either the key is random, so two processes disagree."""
    configured = ThinkingSigner.from_env({THINKING_KEY_ENV: "configured"}, "cluster-token-0123456789")
    assert configured.sign("t") == ThinkingSigner(b"configured").sign("t")
    token = ThinkingSigner.from_env({}, "cluster-token-0123456789")
    assert token.sign("t") == ThinkingSigner.from_env(
        {THINKING_KEY_ENV: ""}, "cluster-token-0123456789"
    ).sign("t")
    assert token.sign("t") == ThinkingSigner(b"cluster-token-0123456789").sign("t") != configured.sign("t")
    assert ThinkingSigner.from_env({}).sign("t") != ThinkingSigner.from_env({}).sign("t")
    assert token.verify("t", token.sign("t")) and not token.verify("u", token.sign("t"))
