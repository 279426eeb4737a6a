"""Error statuses in OpenAI's shape (400 naming the parameter or the context limit, 401, 404, 429, 503),
client disconnects that free their KV blocks, and a fuzz of request bodies that never gets a 5xx."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import API_ENGINE, tiny_api_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2serve.engine.async_engine import AsyncEngine

pytestmark = pytest.mark.timeout(180)
KEY = "sk-test-key"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path) -> Iterator[tuple[str, AsyncEngine]]:
    with tiny_api_server(tiny_ckpt, api_key=KEY) as served:
        yield served


@pytest.fixture(scope="module")
def client(server: tuple[str, AsyncEngine]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(url: str, path: str, body: Any, key: str | None = KEY, timeout: float = 60) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=timeout)


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def wait_until_idle(be: AsyncEngine, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while be.num_in_flight or be.stats().num_running or be.stats().num_waiting:
        assert time.monotonic() < deadline, be.stats()
        time.sleep(0.01)
    blocks = be.engine.blocks  # the engine thread is idle now
    assert blocks.num_free_blocks == blocks.num_blocks
    blocks.check_invariants([])


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": HELLO, "temperature": -1}, "temperature"),
        ("/v1/chat/completions", {"messages": HELLO, "top_p": 1.5}, "top_p"),
        ("/v1/chat/completions", {"messages": HELLO, "n": 0}, "n"),
        ("/v1/chat/completions", {"messages": HELLO, "n": 17}, "n"),
        ("/v1/completions", {"prompt": ["a"] * 40, "n": 2}, "n"),
        ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"messages": HELLO, "max_completion_tokens": -3}, "max_completion_tokens"),
        ("/v1/chat/completions", {"messages": HELLO, "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": HELLO, "presence_penalty": 3}, "presence_penalty"),
        ("/v1/chat/completions", {"messages": HELLO, "stop_token_ids": [10**6]}, "stop_token_ids"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": HELLO, "temperature": "hot"}, "temperature"),
        ("/v1/chat/completions", {"messages": HELLO, "tool_choice": "required"}, "tool_choice"),
        (
            "/v1/chat/completions",
            {"messages": HELLO, "response_format": {"type": "json_schema"}},
            "response_format",
        ),
        ("/v1/completions", {"prompt": [1, 2, 99999]}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {}, "prompt"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(
    server: tuple[str, AsyncEngine], path: str, body: dict[str, Any], param: str
) -> None:
    body = {"model": "tiny", "max_tokens": 4, **body}
    assert_error(post(server[0], path, body), 400, param)


def test_malformed_json_is_400(server: tuple[str, AsyncEngine]) -> None:
    r = httpx.post(
        f"{server[0]}/v1/chat/completions",
        content=b"{not json",
        timeout=30,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert_error(r, 400)


def test_context_limit_is_400_naming_the_limit(client: openai.OpenAI) -> None:
    long_prompt = [{"role": "user", "content": "a b " * 400}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=long_prompt, max_tokens=4)  # type: ignore[arg-type]
    err = info.value.body
    assert isinstance(err, dict) and err["param"] == "messages" and "512" in err["message"]
    assert err["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=list(range(100)), max_tokens=500)
    err = info.value.body
    assert isinstance(err, dict) and err["param"] == "max_tokens" and "512" in err["message"]


def test_api_key_and_model_name(server: tuple[str, AsyncEngine]) -> None:
    url = server[0]
    for key in (None, "wrong", KEY + "x", KEY[:-1]):
        assert_error(post(url, "/v1/chat/completions", {"model": "tiny", "messages": HELLO}, key=key), 401)
    assert httpx.get(f"{url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as info:
        openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0).chat.completions.create(
            model="gpt-4o",
            messages=HELLO,
            max_tokens=2,  # type: ignore[arg-type]
        )
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "model_not_found"
    assert_error(httpx.get(f"{url}/v1/nowhere", headers={"Authorization": f"Bearer {KEY}"}), 404)
    assert httpx.get(f"{url}/health").status_code == 200  # health and metrics need no key
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_client_disconnect_frees_blocks(server: tuple[str, AsyncEngine]) -> None:
    url, be = server
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json=body,
        timeout=30,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines), next(lines)
        assert be.stats().kv_blocks_used > 0
    wait_until_idle(be)
    with pytest.raises(httpx.ReadTimeout):  # non-streamed: the client gives up while it generates
        post(
            url,
            "/v1/completions",
            {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 480, "ignore_eos": True},
            timeout=0.5,
        )
    wait_until_idle(be)


def test_queue_full_is_429_and_draining_is_503(tiny_ckpt: Path) -> None:
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 300, "ignore_eos": True}

    async def scenario(url: str, be: AsyncEngine) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            running = asyncio.ensure_future(http.post("/v1/completions", json=body))
            while be.stats().num_running < 1:
                await asyncio.sleep(0.01)
            waiting = asyncio.ensure_future(http.post("/v1/completions", json={**body, "max_tokens": 3}))
            while be.stats().num_waiting < 1:
                await asyncio.sleep(0.01)
            r = await http.post("/v1/completions", json=body)
            assert_error(r, 429)
            assert int(r.headers["retry-after"]) >= 1
            be.begin_drain()
            assert_error(await http.post("/v1/chat/completions", json={"messages": HELLO}), 503)
            assert (await http.get("/health")).status_code == 503
            first, second = await running, await waiting
            assert first.status_code == second.status_code == 200  # in-flight requests finish
            assert first.json()["usage"]["completion_tokens"] == 300

    with tiny_api_server(tiny_ckpt, config=replace(API_ENGINE, max_num_seqs=1, max_waiting=1)) as served:
        asyncio.run(scenario(*served))


# ---- fuzz ----------------------------------------------------------------------------------------
# Each field is mostly a plausible value and sometimes junk, so that both the success paths and
# every validation path are reached.

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.lists(st.integers(-5, 2000), max_size=3),
    st.just({}),
)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.sampled_from([True] * 9 + [False]).flatmap(
        lambda ok: valid if ok else junk
    )  # junk 1 time in 10


# Never absent or null: the default (up to the context limit) would make each example slow.
small_tokens = st.integers(1, 6) | st.integers(1, 6) | st.sampled_from([0, -1, True, "3", 2.5, [], 2**70])
text = st.text(st.characters(codec="utf-8"), max_size=30) | st.sampled_from(
    [
        "<|im_end|>",
        "<think>",
        "</think>",
        "<|tool_calls_section_begin|>",
        "[EOS]",
        "\x00",
        "\U0010fffd\U000f0002",
    ]
)
call = st.fixed_dictionaries(
    {
        "id": text,
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": text, "arguments": text | st.just({})}),
    }
)
message = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["system", "user", "assistant", "tool", "developer"]))},
    optional={
        "content": mostly(
            text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2)
        ),
        "name": mostly(text),
        "reasoning_content": mostly(text),
        "tool_call_id": mostly(text),
        "tool_calls": mostly(st.lists(call, max_size=2)),
    },
)
schema = st.sampled_from(
    [
        {"type": "object"},
        {"type": "string", "maxLength": 3},
        {"enum": [1, "a"]},
        {},
        {"type": "nonsense"},
        {"properties": 5},
        True,
        False,
        {"type": "object", "properties": {"a": {"type": "integer"}}},
    ]
)
tool = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": st.sampled_from(["f", "g", "bad name", ""])}, optional={"parameters": mostly(schema)}
        ),
    }
)
sampling = {
    "model": mostly(st.sampled_from(["tiny"] * 6 + ["other"])),
    "temperature": mostly(st.floats(-0.5, 2.5)),
    "top_p": mostly(st.floats(-0.2, 1.2)),
    "top_k": mostly(st.integers(-2, 2000)),
    "min_p": mostly(st.floats(-0.2, 1.2)),
    "seed": mostly(st.integers(-(2**65), 2**65)),
    "stop": mostly(text | st.lists(text, max_size=3)),
    "presence_penalty": mostly(st.floats(-2.5, 2.5)),
    "frequency_penalty": mostly(st.floats(-2.5, 2.5)),
    "repetition_penalty": mostly(st.floats(-0.5, 3)),
    "min_tokens": mostly(st.integers(-1, 8)),
    "ignore_eos": mostly(st.booleans()),
    "stop_token_ids": mostly(st.lists(st.integers(-1, 1400), max_size=3)),
    "n": mostly(st.sampled_from([1, 1, 2])),
    "stream": st.booleans(),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "skip_special_tokens": mostly(st.booleans()),
}
tool_choice = st.sampled_from(["none", "auto", "required"]) | st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "x"])})}
)
response_format = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "json_object", "json_schema"])},
    optional={"json_schema": st.fixed_dictionaries({"schema": mostly(schema)}, optional={"name": text})},
)
chat_body = st.fixed_dictionaries(
    {"messages": mostly(st.lists(message, min_size=1, max_size=3)), "max_tokens": small_tokens},
    optional={
        **sampling,
        "tools": mostly(st.lists(tool, max_size=2)),
        "tool_choice": mostly(tool_choice),
        "logprobs": mostly(st.booleans()),
        "top_logprobs": mostly(st.integers(-1, 25)),
        "max_completion_tokens": small_tokens,
        "response_format": mostly(response_format),
    },
)
completion_body = st.fixed_dictionaries(
    {
        "prompt": mostly(text | st.lists(st.integers(-3, 1300), max_size=6) | st.lists(text, max_size=3)),
        "max_tokens": small_tokens,
    },
    optional={
        **sampling,
        "logprobs": mostly(st.integers(-1, 25)),
        "echo": st.booleans(),
        "suffix": mostly(text),
    },
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    case=st.one_of(
        st.tuples(st.just("/v1/chat/completions"), chat_body),
        st.tuples(st.just("/v1/completions"), completion_body),
    )
)
def test_fuzzed_bodies_never_get_a_5xx(server: tuple[str, AsyncEngine], case: tuple[str, Any]) -> None:
    path, body = case
    r = post(server[0], path, body)
    assert r.status_code < 500, (body, r.text)
    if r.status_code != 200:
        assert_error(r, r.status_code)
    elif body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text


def test_server_still_answers_after_the_fuzz(client: openai.OpenAI, server: tuple[str, AsyncEngine]) -> None:
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason in ("length", "stop")
    wait_until_idle(server[1])
