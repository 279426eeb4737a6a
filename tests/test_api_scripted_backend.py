"""The app over a second GenerationBackend that replays a scripted K2 output: reasoning, content and
tool-call parsing (streamed and not), the structured spec the backend receives, mid-stream failures,
and the abort a closed stream sends. It also shows the app needs nothing beyond the protocol."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import ScriptedBackend, scripted_backend

from k2serve.api.openai_app import build_app
from k2serve.engine.protocol import (
    GenerationBackend,
)
from k2serve.testing.app_server import serve_in_thread

pytestmark = pytest.mark.timeout(60)
OUTPUT = (
    "<think>Let me think.</think>Sure, checking.<|tool_calls_section_begin|><|tool_call_begin|>"
    'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
    "<|tool_calls_section_end|><|im_end|>"
)
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
]
MSGS: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> ScriptedBackend:
    return scripted_backend(tmp_path_factory, OUTPUT)


@pytest.fixture(scope="module")
def url(backend: ScriptedBackend) -> Iterator[str]:
    with serve_in_thread(build_app(backend)) as base:
        yield base


@pytest.fixture
def client(url: str, backend: ScriptedBackend) -> openai.OpenAI:
    backend.fail_at, backend.delay_s = None, 0.0
    backend.requests.clear()
    backend.aborted.clear()
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)


def test_the_scripted_backend_satisfies_the_protocol(backend: ScriptedBackend) -> None:
    assert isinstance(backend, GenerationBackend)


def test_reasoning_content_and_tool_calls_are_parsed(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    r = client.chat.completions.create(model="scripted", messages=MSGS, tools=TOOLS, max_tokens=200)
    msg = r.choices[0].message
    assert msg.model_extra is not None and msg.model_extra["reasoning_content"] == "Let me think."
    assert msg.content == "Sure, checking." and r.choices[0].finish_reason == "tool_calls"
    assert msg.tool_calls is not None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "functions.get_weather:0",
        "get_weather",
        {"city": "Paris"},
    )
    assert backend.requests[-1].structured == {"tools": TOOLS, "tool_choice": "auto", "allow_reasoning": True}
    prompt = backend.tokenizer.decode(backend.requests[-1].prompt_token_ids)
    assert "tool_declare" in prompt and "get_weather" in prompt


def test_streamed_deltas_add_up_to_the_same_message(client: openai.OpenAI) -> None:
    reasoning, content, args, ids, finish = "", "", "", [], None
    for chunk in client.chat.completions.create(model="scripted", messages=MSGS, tools=TOOLS, stream=True):
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            ids += [tc.id] if tc.id else []
            args += tc.function.arguments or "" if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert (reasoning, content, ids, finish) == (
        "Let me think.",
        "Sure, checking.",
        ["functions.get_weather:0"],
        "tool_calls",
    )
    assert json.loads(args) == {"city": "Paris"}


def test_structured_specs_sent_to_the_backend(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    client.chat.completions.create(model="scripted", messages=MSGS, tools=TOOLS, tool_choice="required")
    assert backend.requests[-1].structured == {"tools": TOOLS, "tool_choice": "required"}
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}}
    client.chat.completions.create(model="scripted", messages=MSGS, response_format=fmt)
    assert backend.requests[-1].structured == {"response_format": fmt}
    client.chat.completions.create(model="scripted", messages=MSGS, tools=TOOLS, tool_choice="none")
    assert backend.requests[-1].structured is None
    assert "tool_declare" not in backend.tokenizer.decode(backend.requests[-1].prompt_token_ids)
    r = client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=6)
    assert r.choices[0].finish_reason == "length" and backend.requests[-1].params.max_tokens == 6
    assert r.choices[0].message.model_extra is not None
    assert r.choices[0].message.model_extra["reasoning_content"]  # cut inside the reasoning


def test_backend_failures_become_openai_errors(
    client: openai.OpenAI, url: str, backend: ScriptedBackend
) -> None:
    backend.fail_at = 4
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="scripted", messages=MSGS)
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "backend_failure"
    body = {"model": "scripted", "messages": MSGS, "stream": True}
    lines = [
        ln for ln in httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).text.splitlines() if ln
    ]
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "backend_failure"
    assert lines[-1] == "data: [DONE]"


def test_closing_a_stream_early_aborts_the_request(
    url: str, backend: ScriptedBackend, client: openai.OpenAI
) -> None:
    backend.delay_s = 0.05
    body = {"model": "scripted", "prompt": "hi", "stream": True, "max_tokens": 100}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        next(r.iter_lines())
    for _ in range(200):
        if backend.aborted:
            break
        time.sleep(0.01)
    assert backend.aborted == [backend.requests[-1].request_id]
