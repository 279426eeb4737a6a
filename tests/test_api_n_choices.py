"""n > 1 on the real engine: choice j of a seeded request is the n=1 request seeded seed + j (the same
tokens), the choices differ, usage counts the prompt once, a stream gives the same choices, and
/v1/completions orders a batch's choices prompt by prompt (index p * n + j)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.timeout(120)
MSGS: list[Any] = [{"role": "user", "content": "Tell me about the moon."}]


def test_chat_choices_are_the_seeded_single_requests(api_client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "tiny", "messages": MSGS, "max_tokens": 6, "temperature": 1.0}
    r = api_client.chat.completions.create(n=3, seed=11, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    singles = [api_client.chat.completions.create(n=1, seed=11 + j, **kw) for j in range(3)]
    assert texts == [s.choices[0].message.content for s in singles]
    assert len(set(texts)) > 1
    assert r.usage is not None and singles[0].usage is not None
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the prompt once
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles if s.usage)


def test_chat_stream_with_n(api_url: str, api_client: openai.OpenAI) -> None:
    body: dict[str, Any] = {"model": "tiny", "messages": MSGS, "max_tokens": 6, "n": 2, "seed": 5}
    plain = api_client.chat.completions.create(**body)
    texts = ["", ""]
    finished = [None, None]
    usage = None
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{api_url}/v1/chat/completions", json=payload, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line.removeprefix("data: "))
            usage = obj.get("usage") or usage
            for c in obj["choices"]:
                texts[c["index"]] += c["delta"].get("content") or ""
                finished[c["index"]] = c["finish_reason"] or finished[c["index"]]
    assert texts == [c.message.content for c in plain.choices]
    assert finished == ["length", "length"]
    assert plain.usage is not None and usage["completion_tokens"] == plain.usage.completion_tokens


def test_completions_n_orders_choices_by_prompt(api_client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "tiny", "max_tokens": 4, "temperature": 1.0, "seed": 3}
    r = api_client.completions.create(prompt=["The sky", "A cat"], n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(["The sky", "A cat"]):
        for j in range(2):
            single = api_client.completions.create(prompt=prompt, n=1, **{**kw, "seed": 3 + j})
            assert r.choices[p * 2 + j].text == single.choices[0].text
    one = api_client.completions.create(prompt=["The sky", "A cat"], n=1, **kw)
    assert r.usage is not None and one.usage is not None and r.usage.prompt_tokens == one.usage.prompt_tokens


def test_n_with_a_session_is_refused(api_url: str) -> None:
    r = httpx.post(
        f"{api_url}/v1/chat/completions",
        json={"messages": MSGS, "n": 2, "session_id": "sess_" + "a" * 32},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
