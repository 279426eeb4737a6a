"""OpenAI's Responses API over a scripted K2 output, with `openai`'s `client.responses`: reasoning,
message and function_call items (plain and streamed), previous_response_id on the session store
(the continued prompt is the equivalent chat completion's, token for token; branches), GET / DELETE,
owner isolation by API key, store=false, instructions, and errors in OpenAI's shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from conftest import ScriptedBackend, scripted_backend

from k2serve.api.openai_app import build_app
from k2serve.testing.app_server import serve_in_thread

pytestmark = pytest.mark.timeout(60)
KEY_A, KEY_B = "key-alice", "key-bob"
OUTPUT = (
    "<think>Let me think.</think>Sure, checking.<|tool_calls_section_begin|><|tool_call_begin|>"
    'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
    "<|tool_calls_section_end|><|im_end|>"
)
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS: list[Any] = [
    {"type": "function", "name": "get_weather", "description": "Weather", "parameters": PARAMS}
]
CHAT_TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": PARAMS}}
]


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> ScriptedBackend:
    return scripted_backend(tmp_path_factory, OUTPUT)


@pytest.fixture(scope="module")
def url(backend: ScriptedBackend) -> Iterator[str]:
    with serve_in_thread(build_app(backend, api_key=f"{KEY_A},{KEY_B}")) as base:
        yield base


def make_client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture
def client(url: str, backend: ScriptedBackend) -> openai.OpenAI:
    backend.fail_at, backend.delay_s = None, 0.0
    backend.requests.clear()
    return make_client(url, KEY_A)


def prompt_text(backend: ScriptedBackend) -> str:
    return backend.tokenizer.decode(backend.requests[-1].prompt_token_ids)


def test_output_items(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    r = client.responses.create(model="scripted", input="Weather in Paris?", tools=TOOLS)
    assert [item.type for item in r.output] == ["reasoning", "message", "function_call"]
    reasoning, message, call = r.output
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "Let me think."
    assert r.output_text == "Sure, checking."
    assert call.type == "function_call"
    assert (call.call_id, call.name, json.loads(call.arguments)) == (
        "functions.get_weather:0",
        "get_weather",
        {"city": "Paris"},
    )
    assert r.status == "completed" and r.id.startswith("resp_") and r.model == "scripted"
    assert r.usage is not None
    assert r.usage.input_tokens == len(backend.requests[-1].prompt_token_ids)
    assert r.usage.output_tokens == len(backend.script)
    assert r.usage.input_tokens_details.cached_tokens == 0
    assert backend.requests[-1].session is None  # a chain's first response takes no session


def test_stream_events_and_final_response(client: openai.OpenAI) -> None:
    plain = client.responses.create(model="scripted", input="Weather in Paris?", tools=TOOLS)
    kinds = [
        ev.type
        for ev in client.responses.create(model="scripted", input="Weather?", tools=TOOLS, stream=True)
    ]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    for kind in (
        "response.output_item.added",
        "response.output_item.done",
        "response.reasoning_text.delta",
        "response.output_text.delta",
        "response.content_part.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
    ):
        assert kind in kinds, kind
    with client.responses.stream(model="scripted", input="Weather in Paris?", tools=TOOLS) as stream:
        final = stream.get_final_response()
    assert final.output_text == plain.output_text
    assert [i.type for i in final.output] == [i.type for i in plain.output]
    assert final.output[2].model_dump(exclude={"id", "parsed_arguments"}) == plain.output[2].model_dump(
        exclude={"id"}
    )
    assert client.responses.retrieve(final.id).output_text == "Sure, checking."


def test_previous_response_id_continues_the_session(
    client: openai.OpenAI, url: str, backend: ScriptedBackend
) -> None:
    """The turn after a function call sends only its new input; the prompt is the equivalent chat
    completion's (whole history) token for token. The chain's second response opens its session, the
    third continues it; a branch from the first starts another."""
    first = client.responses.create(model="scripted", input="Weather in Paris?", tools=TOOLS)
    second = client.responses.create(
        model="scripted",
        previous_response_id=first.id,
        tools=TOOLS,
        input=[{"type": "function_call_output", "call_id": "functions.get_weather:0", "output": "18C"}],
    )
    continued = backend.requests[-1]
    session = continued.session
    assert session is not None and second.previous_response_id == first.id
    client.responses.create(model="scripted", previous_response_id=second.id, input="Thanks!", tools=TOOLS)
    third = backend.requests[-1]
    assert third.session is not None and third.session.session_id == session.session_id
    assert third.prompt_token_ids[: len(continued.prompt_token_ids)] == continued.prompt_token_ids
    make_client(url, KEY_A).chat.completions.create(
        model="scripted",
        tools=CHAT_TOOLS,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "Sure, checking.",
                "reasoning_content": "Let me think.",  # type: ignore[typeddict-unknown-key]
                "tool_calls": [
                    {
                        "id": "functions.get_weather:0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18C"},
        ],
    )
    assert backend.requests[-1].prompt_token_ids == continued.prompt_token_ids

    # a branch from the first response again: the second turn is not in its history
    client.responses.create(model="scripted", previous_response_id=first.id, input="Rome instead?")
    branch = backend.requests[-1]
    assert branch.session is not None and branch.session.session_id != session.session_id
    assert "Rome instead?" in prompt_text(backend) and "18C" not in prompt_text(backend)
    assert "Weather in Paris?" in prompt_text(backend)


def test_input_items_round_trip_as_history(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    """Stateless: the whole history sent as items (reasoning, function_call, its output)."""
    items: list[Any] = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "Let me think."}],
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Sure, checking."}],
        },
        {
            "type": "function_call",
            "call_id": "functions.get_weather:0",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "functions.get_weather:0", "output": "18C"},
    ]
    client.responses.create(model="scripted", input=items, tools=TOOLS, store=False)
    stateless = backend.requests[-1]
    assert stateless.session is None
    first = client.responses.create(model="scripted", input="Weather in Paris?", tools=TOOLS)
    client.responses.create(model="scripted", previous_response_id=first.id, input=items[-1:], tools=TOOLS)
    assert backend.requests[-1].prompt_token_ids == stateless.prompt_token_ids


def test_get_delete_and_owner_isolation(client: openai.OpenAI, url: str) -> None:
    r = client.responses.create(model="scripted", input="hello", metadata={"run": "7"})
    got = client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump() and got.metadata == {"run": "7"}
    bob = make_client(url, KEY_B)
    for call in (
        lambda: bob.responses.retrieve(r.id),
        lambda: bob.responses.delete(r.id),
        lambda: bob.responses.create(model="scripted", previous_response_id=r.id, input="hi"),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.code == "response_not_found"
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="scripted", previous_response_id=r.id, input="hi")


def test_store_false_is_not_retrievable(client: openai.OpenAI) -> None:
    r = client.responses.create(model="scripted", input="hello", store=False)
    assert r.output_text and r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_instructions_are_not_carried_over(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    first = client.responses.create(model="scripted", input="hello", instructions="Speak like a pirate.")
    assert "Speak like a pirate." in prompt_text(backend)
    client.responses.create(model="scripted", input="again", previous_response_id=first.id)
    assert "Speak like a pirate." not in prompt_text(backend) and "hello" in prompt_text(backend)


def test_tool_choice_and_text_format(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    client.responses.create(
        model="scripted", input="x", tools=TOOLS, tool_choice={"type": "function", "name": "get_weather"}
    )
    structured = backend.requests[-1].structured
    assert structured is not None
    assert structured["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    client.responses.create(
        model="scripted", input="x", text={"format": {"type": "json_schema", "name": "a", "schema": schema}}
    )
    structured = backend.requests[-1].structured
    assert structured is not None and structured["response_format"]["json_schema"]["schema"] == schema


def test_max_output_tokens_gives_an_incomplete_response(client: openai.OpenAI) -> None:
    r = client.responses.create(model="scripted", input="x", max_output_tokens=4)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 4


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}
                ]
            },
            "input[0].content[0]",
        ),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "max_output_tokens": 100000}, "max_output_tokens"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": "x", "temperature": -1}, "temperature"),
        ({"input": []}, "input"),
    ],
)
def test_errors_in_openai_shape(client: openai.OpenAI, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="scripted", **kwargs)
    assert e.value.param == param, e.value.body


def test_a_failure_mid_stream_is_a_failed_response(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    backend.fail_at = 4
    events = list(client.responses.create(model="scripted", input="x", stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.error is not None and "scripted failure" in events[-1].response.error.message
