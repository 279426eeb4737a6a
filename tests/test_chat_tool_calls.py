"""K2 tool calls as Moonshot asks of vendors (issue 19 item 3): historical tool-call ids rendered as
`functions.{name}:{index}` whatever the client sent, no tool-call text leaking into a turn without tools,
and `parallel_tool_calls: false` kept to one call (grammar when forced, parser under auto). Over the
OpenAI app with a scripted backend (it replays a fixed K2 output) and the real grammar compiler."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from conftest import ScriptedBackend

from k2serve.api.openai_app import build_app
from k2serve.chat.bpe_train import write_tokenizer
from k2serve.chat.request import plan_chat
from k2serve.chat.structured import GrammarCompiler, GrammarViolation
from k2serve.chat.tokenizer import KimiTokenizer, load_tokenizer
from k2serve.chat.tool_ids import k2_tool_call_ids
from k2serve.testing.app_server import serve_in_thread

pytestmark = pytest.mark.timeout(60)
TWO_CALLS = (
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    '{"city": "Paris"}<|tool_call_end|><|tool_call_begin|>functions.get_weather:1'
    '<|tool_call_argument_begin|>{"city": "Rome"}<|tool_call_end|><|tool_calls_section_end|>'
)
OUTPUT = f"<think>Hmm.</think>Sure, checking.{TWO_CALLS}<|im_end|>"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS: list[Any] = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
MSGS: list[Any] = [{"role": "user", "content": "Weather in Paris and Rome?"}]
HISTORY: list[Any] = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            {"id": "toolu_xyz", "type": "function", "function": {"name": "search", "arguments": "{}"}},
        ],
    },
    {"role": "tool", "tool_call_id": "toolu_xyz", "content": "found"},
    {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [  # a client that reuses ids across turns
            {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc", "content": "rainy"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> KimiTokenizer:
    out: Path = tmp_path_factory.mktemp("tok")
    write_tokenizer(out, 1024)
    return load_tokenizer(out)


@pytest.fixture(scope="module")
def backend(tok: KimiTokenizer) -> ScriptedBackend:
    return ScriptedBackend(tok, tok.encode(OUTPUT))


@pytest.fixture(scope="module")
def url(backend: ScriptedBackend) -> Iterator[str]:
    with serve_in_thread(build_app(backend)) as base:
        yield base


@pytest.fixture
def client(url: str, backend: ScriptedBackend) -> openai.OpenAI:
    backend.requests.clear()
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)


# ----- 1. historical ids in K2's form -----


def test_historical_ids_are_renumbered_in_k2_form_and_results_follow() -> None:
    out = k2_tool_call_ids(HISTORY)
    assert [c["id"] for c in out[1]["tool_calls"]] == ["functions.get_weather:0", "functions.search:1"]
    assert out[2]["tool_call_id"] == "functions.search:1"
    assert out[3]["tool_call_id"] == "functions.get_weather:0"
    assert out[4]["tool_calls"][0]["id"] == "functions.get_weather:2"
    assert out[5]["tool_call_id"] == "functions.get_weather:2"  # a reused client id maps to its latest call
    assert HISTORY[1]["tool_calls"][0]["id"] == "call_abc"  # the input is not modified
    assert k2_tool_call_ids([{"role": "tool", "tool_call_id": "orphan", "content": "x"}])[0][
        "tool_call_id"
    ] == ("orphan")


def test_the_prompt_carries_k2_ids_not_the_clients(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    client.chat.completions.create(model="scripted", messages=HISTORY, tools=TOOLS, max_tokens=200)
    prompt = backend.tokenizer.decode(backend.requests[-1].prompt_token_ids)
    assert "call_abc" not in prompt and "toolu_xyz" not in prompt
    assert "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>" in prompt
    assert "<|tool_call_begin|>functions.search:1<|tool_call_argument_begin|>" in prompt
    assert "## Return of functions.search:1\nfound" in prompt
    assert "## Return of functions.get_weather:0\nsunny" in prompt
    assert "## Return of functions.get_weather:2\nrainy" in prompt


def test_anthropic_tool_use_ids_are_rendered_in_k2_form(url: str, backend: ScriptedBackend) -> None:
    backend.requests.clear()
    client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=30)
    client.messages.create(
        model="scripted",
        max_tokens=200,
        tools=[{"name": "get_weather", "input_schema": WEATHER}],
        messages=[
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "P"}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_01A", "content": "sunny"}],
            },
        ],
    )
    prompt = backend.tokenizer.decode(backend.requests[-1].prompt_token_ids)
    assert "toolu_01A" not in prompt
    assert "## Return of functions.get_weather:0\nsunny" in prompt


# ----- 2. no tools: no tool-call text in content -----


def test_a_turn_without_tools_never_leaks_tool_call_text(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=200)
    msg = r.choices[0].message
    assert msg.content == "Sure, checking." and not msg.tool_calls
    assert r.choices[0].finish_reason == "stop"
    pieces = client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=200, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert streamed == "Sure, checking."


def test_tool_choice_none_drops_the_section_too(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="scripted", messages=MSGS, tools=TOOLS, tool_choice="none", max_tokens=200
    )
    assert r.choices[0].message.content == "Sure, checking." and not r.choices[0].message.tool_calls


def test_raw_special_tokens_requested_still_leak_no_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="scripted", messages=MSGS, max_tokens=200, extra_body={"skip_special_tokens": False}
    )
    content = r.choices[0].message.content or ""
    assert "functions.get_weather" not in content and "Paris" not in content


# ----- 3. parallel_tool_calls: false -----


def test_parallel_calls_by_default(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="scripted", messages=MSGS, tools=TOOLS, max_tokens=200)
    calls = r.choices[0].message.tool_calls or []
    assert [c.function.arguments for c in calls] == ['{"city": "Paris"}', '{"city": "Rome"}']


def test_parallel_tool_calls_false_keeps_one_call_under_auto(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="scripted", messages=MSGS, tools=TOOLS, parallel_tool_calls=False, max_tokens=200
    )
    calls = r.choices[0].message.tool_calls or []
    assert [(c.id, c.function.arguments) for c in calls] == [("functions.get_weather:0", '{"city": "Paris"}')]
    assert r.choices[0].finish_reason == "tool_calls"
    pieces = client.chat.completions.create(
        model="scripted", messages=MSGS, tools=TOOLS, parallel_tool_calls=False, max_tokens=200, stream=True
    )
    indexes = {tc.index for c in pieces if c.choices for tc in c.choices[0].delta.tool_calls or []}
    assert indexes == {0}


def test_parallel_tool_calls_false_reaches_the_forced_grammar(
    client: openai.OpenAI, backend: ScriptedBackend
) -> None:
    client.chat.completions.create(
        model="scripted",
        messages=MSGS,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
    )
    assert backend.requests[-1].structured is not None
    assert backend.requests[-1].structured["parallel_tool_calls"] is False


def _accepts(compiler: GrammarCompiler, structured: dict[str, Any], ids: list[int]) -> bool:
    from k2serve.engine.validation import compile_structured

    constraint = compile_structured(compiler, structured)
    assert constraint is not None
    try:
        for t in ids:
            constraint.accept(t)
    except GrammarViolation:
        return False
    return True


def test_the_forced_grammar_allows_one_call_without_parallel(tok: KimiTokenizer) -> None:
    compiler = GrammarCompiler(tok)
    two = tok.encode(TWO_CALLS)
    parallel = plan_chat(MSGS, TOOLS, "required").structured
    single = plan_chat(MSGS, TOOLS, "required", parallel_tool_calls=False).structured
    assert parallel is not None and single is not None
    assert _accepts(compiler, parallel, two)
    assert not _accepts(compiler, single, two)
    one = tok.encode(
        TWO_CALLS.split("<|tool_call_begin|>functions.get_weather:1")[0] + "<|tool_calls_section_end|>"
    )
    assert _accepts(compiler, single, one)


# ----- 4. the grammar under tool_choice "auto", and strict -----

SECTION = "<|tool_calls_section_begin|><|tool_call_begin|>functions.{name}:0<|tool_call_argument_begin|>"


def _call(args: str, name: str = "get_weather") -> str:
    return SECTION.format(name=name) + args + "<|tool_call_end|><|tool_calls_section_end|>"


def _auto_accepts(tok: KimiTokenizer, text: str, tools: list[Any] = TOOLS, **kw: Any) -> bool:
    structured = plan_chat(MSGS, tools, **kw).structured
    assert structured is not None and structured["tool_choice"] == "auto"
    return _accepts(GrammarCompiler(tok), structured, [*tok.encode(text), tok.eos_id])


def test_auto_lets_text_and_reasoning_through(tok: KimiTokenizer) -> None:
    assert _auto_accepts(tok, "<think>Hmm, no tool needed.</think>It is sunny.\nBye.")
    assert _auto_accepts(tok, OUTPUT.removesuffix("<|im_end|>"))


def test_auto_binds_the_schema_once_the_section_opens(tok: KimiTokenizer) -> None:
    assert _auto_accepts(tok, "Checking." + _call('{"city": "Paris"}'))
    assert not _auto_accepts(tok, "Checking." + _call('{"city": 5}'))  # wrong type
    assert not _auto_accepts(tok, "Checking." + _call("{}"))  # required key missing
    assert not _auto_accepts(tok, "Checking." + _call('{"city": "Paris"}', name="delete_all"))  # undeclared
    assert not _auto_accepts(tok, "Checking." + _call('{"city": "Paris"'))  # not JSON


def test_auto_without_parallel_allows_one_call(tok: KimiTokenizer) -> None:
    assert _auto_accepts(tok, TWO_CALLS)
    assert not _auto_accepts(tok, TWO_CALLS, parallel_tool_calls=False)


def test_strict_closes_the_schema(tok: KimiTokenizer) -> None:
    extra = _call('{"city": "Paris", "units": "C"}')
    strict: list[Any] = [
        {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER, "strict": True}}
    ]
    assert _auto_accepts(tok, extra)  # not strict: the schema as written (extra keys allowed)
    assert not _auto_accepts(tok, extra, tools=strict)
    assert _auto_accepts(tok, _call('{"city": "Paris"}'), tools=strict)


def test_auto_reaches_the_backend_as_a_grammar(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    client.chat.completions.create(model="scripted", messages=MSGS, tools=TOOLS, max_tokens=200)
    assert backend.requests[-1].structured == {"tools": TOOLS, "tool_choice": "auto", "allow_reasoning": True}
    fmt = {"type": "json_object"}
    client.chat.completions.create(
        model="scripted",
        messages=MSGS,
        tools=TOOLS,
        response_format=fmt,
        max_tokens=200,  # type: ignore[arg-type]
    )
    assert backend.requests[-1].structured == {"response_format": fmt}
