"""Issue 19's small ones, over a scripted backend: vLLM's /tokenize and /detokenize (the chat form gives
exactly the prompt a chat completion sends), `reasoning` as an alias of `reasoning_content` (input and
output, streamed too), and content parts other than text refused with a 400 that names them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import ScriptedBackend, scripted_backend

from k2serve.api.openai_app import build_app
from k2serve.testing.app_server import serve_in_thread

pytestmark = pytest.mark.timeout(60)
KEY = "tok-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
OUTPUT = "<think>Let me think.</think>Sure.<|im_end|>"
TOOLS: list[Any] = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
MSGS: list[Any] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi <|im_end|> there"},
]


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> ScriptedBackend:
    return scripted_backend(tmp_path_factory, OUTPUT)


@pytest.fixture(scope="module")
def url(backend: ScriptedBackend) -> Iterator[str]:
    with serve_in_thread(build_app(backend, api_key=KEY)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)


def test_tokenize_text_and_detokenize(url: str, backend: ScriptedBackend) -> None:
    r = httpx.post(f"{url}/tokenize", json={"prompt": "Hello world", "return_token_strs": True}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == backend.tokenizer.encode("Hello world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == backend.max_model_len and "".join(body["token_strs"]) == "Hello world"
    back = httpx.post(f"{url}/detokenize", json={"tokens": body["tokens"]}, headers=AUTH)
    assert back.json() == {"prompt": "Hello world"}


def test_tokenize_messages_is_the_chat_prompt(
    url: str, client: openai.OpenAI, backend: ScriptedBackend
) -> None:
    r = httpx.post(
        f"{url}/tokenize", json={"model": "scripted", "messages": MSGS, "tools": TOOLS}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    client.chat.completions.create(model="scripted", messages=MSGS, tools=TOOLS, max_tokens=5)
    assert r.json()["tokens"] == backend.requests[-1].prompt_token_ids
    assert r.json()["token_strs"] is None


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": "x", "messages": MSGS}, 400, "body"),
        ("/tokenize", {}, 400, "body"),
        ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ],
)
def test_tokenize_errors(url: str, path: str, body: dict[str, Any], status: int, param: str) -> None:
    r = httpx.post(f"{url}{path}", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_tokenize_needs_the_key(url: str) -> None:
    assert httpx.post(f"{url}/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.post(f"{url}/detokenize", json={"tokens": [1]}).status_code == 401


def test_reasoning_alias_in_the_output(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=50)
    extra = r.choices[0].message.model_extra or {}
    assert extra["reasoning"] == extra["reasoning_content"] == "Let me think."
    chunks = list(client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=50, stream=True))
    deltas = [c.choices[0].delta.model_extra or {} for c in chunks if c.choices]
    assert "".join(d.get("reasoning", "") for d in deltas) == "Let me think."
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)


def test_reasoning_alias_in_the_input(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    def prompt_with(field: str) -> list[int]:
        messages: list[Any] = [
            *MSGS,
            {
                "role": "assistant",
                "content": "Sure.",
                field: "Earlier thoughts.",  # kept by the template: a tool-call turn being continued
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ]
        client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS, max_tokens=5)
        return backend.requests[-1].prompt_token_ids

    aliased = prompt_with("reasoning")
    assert aliased == prompt_with("reasoning_content")
    assert "Earlier thoughts." in backend.tokenizer.decode(aliased)


def test_non_text_content_parts_are_refused_by_name(client: openai.OpenAI) -> None:
    part = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="scripted",
            messages=[{"role": "user", "content": [{"type": "text", "text": "look"}, part]}],  # type: ignore[list-item]
            max_tokens=5,
        )
    assert e.value.param == "messages[0].content"
    assert "content part 1 is of type 'image_url'" in json.dumps(e.value.body)
