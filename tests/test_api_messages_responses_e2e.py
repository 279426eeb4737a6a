"""Anthropic's Messages API and OpenAI's Responses API on the real engine, with the vendors' SDKs, through
`k2serve serve` (a real process, sessions in memory) and through a cluster (router + prefill + decode,
sessions in Redis): greedy answers equal the chat completion's (the same one chat path), streaming gives
the same message, count_tokens is the billed input, forced tool round trips return calls whose
arguments validate, previous_response_id reuses the cached prefix, and keys are checked and isolate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest
from conftest import local_cluster_spec, serve_process

from k2serve.cluster.local import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
KEY, OTHER_KEY = "e2e-key", "e2e-other-key"
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome"]},
        "unit": {"type": "string", "enum": ["C", "F"]},
    },
    "required": ["city"],
    "additionalProperties": False,
}
GREEDY = {"temperature": 0}  # the anthropic SDK 2.x has no temperature argument: sent as an extra field
TOOLS: list[Any] = [{"name": "get_weather", "description": "Weather of a city", "input_schema": SCHEMA}]


@pytest.fixture(scope="module", params=["serve", "cluster"])
def url(
    request: pytest.FixtureRequest, tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "serve":
        with serve_process(tmp, f"{KEY},{OTHER_KEY}") as served:
            yield served
    else:
        with LocalCluster(
            local_cluster_spec(tiny_ckpt, tmp, api_key=f"{KEY},{OTHER_KEY}", use_redis=True)
        ) as cluster:
            yield cluster.http_url


@pytest.fixture(scope="module")
def model(url: str) -> str:
    models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    return str(models.json()["data"][0]["id"])


@pytest.fixture(scope="module")
def client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=120)


def blocks_of(message: Any) -> list[tuple[str, str]]:
    return [(b.type, b.thinking if b.type == "thinking" else b.text) for b in message.content]


def test_greedy_answer_is_the_chat_completions(client: anthropic.Anthropic, url: str, model: str) -> None:
    system, ask = "You answer in French.", "Name three colours of the rainbow."
    kwargs: dict[str, Any] = {"model": model, "max_tokens": 24}
    counted = client.messages.count_tokens(
        model=model, system=system, messages=[{"role": "user", "content": ask}]
    )
    r = client.messages.create(
        system=system, messages=[{"role": "user", "content": ask}], extra_body=GREEDY, **kwargs
    )
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    chat = oa.chat.completions.create(
        messages=[{"role": "system", "content": system}, {"role": "user", "content": ask}],
        temperature=0,
        **kwargs,
    )
    msg = chat.choices[0].message
    expected = []
    reasoning = (msg.model_extra or {}).get("reasoning_content")
    if reasoning:
        expected.append(("thinking", reasoning))
    if msg.content:
        expected.append(("text", msg.content))
    assert blocks_of(r) == expected
    assert chat.usage is not None
    assert r.usage.output_tokens == chat.usage.completion_tokens
    billed = r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0)
    assert counted.input_tokens == billed == chat.usage.prompt_tokens
    assert r.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]


def test_stream_gives_the_same_message(client: anthropic.Anthropic, model: str) -> None:
    kwargs: dict[str, Any] = {
        "model": model,
        "max_tokens": 20,
        "extra_body": GREEDY,
        "messages": [{"role": "user", "content": "Tell me a story about a lighthouse."}],
    }
    plain = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert blocks_of(final) == blocks_of(plain) and final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens == 20
    assert (
        final.usage.cache_read_input_tokens is not None and final.usage.cache_read_input_tokens > 0
    )  # 2nd time
    total = final.usage.input_tokens + final.usage.cache_read_input_tokens
    assert total == plain.usage.input_tokens + (plain.usage.cache_read_input_tokens or 0)


def test_forced_tool_round_trip(client: anthropic.Anthropic, model: str) -> None:
    ask: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    choice: Any = {"type": "tool", "name": "get_weather"}
    with client.messages.stream(
        model=model, max_tokens=64, extra_body=GREEDY, messages=ask, tools=TOOLS, tool_choice=choice
    ) as stream:
        deltas = {ev.delta.type for ev in stream if ev.type == "content_block_delta"}
        first = stream.get_final_message()
    assert "input_json_delta" in deltas
    assert first.stop_reason == "tool_use", first.content
    calls = [b for b in first.content if b.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(calls[0].input, SCHEMA)
    history: list[Any] = [
        *ask,
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": "18C, sunny"}],
        },
    ]
    second = client.messages.create(
        model=model, max_tokens=8, extra_body=GREEDY, messages=history, tools=TOOLS
    )
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert second.usage.output_tokens > 0
    counted = client.messages.count_tokens(model=model, messages=history, tools=TOOLS)
    assert counted.input_tokens == second.usage.input_tokens + (second.usage.cache_read_input_tokens or 0)


def test_keys_and_errors(url: str, model: str) -> None:
    wrong = anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.create(model=model, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    bearer = anthropic.Anthropic(base_url=url, auth_token=KEY, max_retries=0, timeout=30)
    with pytest.raises(anthropic.BadRequestError) as bad:
        bearer.messages.create(model=model, max_tokens=100000, messages=[{"role": "user", "content": "hi"}])
    assert "max_tokens" in bad.value.message


@pytest.fixture(scope="module")
def oa(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_responses_chain_reuses_the_prefix_and_equals_the_chat(oa: openai.OpenAI, model: str) -> None:
    ask = "Describe the sea at night in a few words. " * 6
    first = oa.responses.create(model=model, input=ask, max_output_tokens=8, temperature=0)
    second = oa.responses.create(
        model=model, previous_response_id=first.id, input="And by day?", max_output_tokens=8, temperature=0
    )
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // 2  # the prefix
    reply: dict[str, Any] = {"role": "assistant", "content": first.output_text}
    reasoning = [i for i in first.output if i.type == "reasoning"]
    if reasoning and reasoning[0].content:
        reply["reasoning_content"] = reasoning[0].content[0].text
    chat = oa.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": ask}, reply, {"role": "user", "content": "And by day?"}],  # type: ignore[list-item]
        max_tokens=8,
        temperature=0,
    )
    assert second.output_text == (chat.choices[0].message.content or "")
    with oa.responses.stream(
        model=model, previous_response_id=second.id, input="And at dawn?", max_output_tokens=6, temperature=0
    ) as stream:
        kinds = {ev.type for ev in stream}
        third = stream.get_final_response()
    assert {"response.created", "response.output_item.added", "response.completed"} <= kinds or (
        third.status == "incomplete"
    )
    assert oa.responses.retrieve(third.id).output_text == third.output_text


def test_responses_forced_tool_round_trip(oa: openai.OpenAI, model: str) -> None:
    tools: list[Any] = [{"type": "function", "name": "get_weather", "parameters": SCHEMA, "strict": True}]
    first = oa.responses.create(
        model=model,
        input="Weather in Rome?",
        tools=tools,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=64,
        temperature=0,
    )
    calls = [i for i in first.output if i.type == "function_call"]
    assert first.status == "completed" and len(calls) == 1
    jsonschema.validate(json.loads(calls[0].arguments), SCHEMA)
    second = oa.responses.create(
        model=model,
        previous_response_id=first.id,
        tools=tools,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "21C"}],
        max_output_tokens=6,
        temperature=0,
    )
    assert second.usage is not None and second.usage.output_tokens > 0
    assert second.usage.input_tokens_details.cached_tokens > 0


def test_responses_owner_isolation(url: str, oa: openai.OpenAI, model: str) -> None:
    r = oa.responses.create(model=model, input="hi", max_output_tokens=2)
    other = openai.OpenAI(base_url=f"{url}/v1", api_key=OTHER_KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=model, previous_response_id=r.id, input="x", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(r.id)
    oa.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        oa.responses.retrieve(r.id)
