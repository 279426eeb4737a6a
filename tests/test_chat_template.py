"""The native K2 prompt renderer against the official Kimi-K2-Thinking Jinja template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2serve.chat.template import (
    ChatTemplateError,
    apply_chat_template,
    render_jinja_template,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
OFFICIAL = SHARED / "reference" / "kimi-k2-thinking.chat_template.jinja"


@pytest.fixture(scope="module")
def official() -> str:
    if not OFFICIAL.exists():
        pytest.skip(f"official K2 template not found at {OFFICIAL} (the repo's sibling ../shared)")
    return OFFICIAL.read_text(encoding="utf-8")


# ----- strategies -----

_PIECES = [
    "<|", "|>", "{{", "}}", "{%", "%}", "{#", "#}", "<think>", "</think>", "<|im_end|>",
    "<|tool_call_begin|>", '"', "'", "\\", "\n", " ", "  ", "\t", "你好", "🙂", "é", "&", "<", ">",
    "functions.f:0", "None", "null",
]  # fmt: skip
texts = st.one_of(
    st.text(max_size=12),
    st.lists(st.sampled_from(_PIECES), max_size=6).map("".join),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(texts, json_values, max_size=4)
names = st.sampled_from(["get_weather", "search", "calc", "a.b", "x_1"])


@st.composite
def tool_calls(draw: st.DrawFn) -> list[dict[str, Any]]:
    calls = []
    for idx in range(draw(st.integers(1, 3))):
        name = draw(names)
        args = draw(json_objects)
        form = draw(st.sampled_from(["dict", "json", "raw"]))
        arguments: Any = {"dict": args, "json": json.dumps(args), "raw": draw(texts)}[form]
        calls.append(
            {
                "id": f"functions.{name}:{idx}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    return calls


contents = st.one_of(
    st.none(),
    texts,
    st.lists(
        st.one_of(
            st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
            st.just({"type": "image_url", "image_url": {"url": "http://x/y.png"}}),
            st.just({"type": "image"}),
            st.just({"image": "abc"}),
            st.just({"type": "text"}),
        ),
        max_size=3,
    ),
)


@st.composite
def a_message(draw: st.DrawFn) -> dict[str, Any]:
    role = draw(st.sampled_from(["user", "assistant", "assistant", "tool", "system"]))
    msg: dict[str, Any] = {"role": role, "content": draw(contents)}
    if draw(st.integers(0, 9)) == 0:
        msg["name"] = draw(texts)
    if role == "assistant":
        if draw(st.booleans()):
            msg["reasoning_content"] = draw(st.none() | texts)
        if draw(st.booleans()):
            msg["tool_calls"] = draw(tool_calls())
    elif role == "tool":
        msg["tool_call_id"] = f"functions.{draw(names)}:{draw(st.integers(0, 3))}"
    return msg


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(texts)})
    msgs.extend(draw(st.lists(a_message(), max_size=7)))
    return msgs


tool_specs = st.lists(
    st.builds(
        lambda name, desc, props: {
            "type": "function",
            "function": {
                "name": name,
                "description": desc,
                "parameters": {"type": "object", "properties": props},
            },
        },
        names,
        texts,
        st.dictionaries(texts, st.fixed_dictionaries({"type": st.just("string")}), max_size=3),
    ),
    max_size=3,
)


# ----- tests -----


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=conversations(), tools=st.none() | tool_specs, gen=st.booleans())
def test_native_matches_official_template(
    official: str, msgs: list[dict[str, Any]], tools: list[dict[str, Any]] | None, gen: bool
) -> None:
    expected = render_jinja_template(official, msgs, tools=tools, add_generation_prompt=gen)
    assert apply_chat_template(msgs, tools=tools, add_generation_prompt=gen) == expected


def test_tool_rounds_keep_reasoning_after_last_plain_assistant(official: str) -> None:
    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "巴黎"}}}  # fmt: skip
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "reasoning_content": "old thought"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "reasoning_content": "need tool", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    out = apply_chat_template(msgs, tools=tools)
    assert out == (
        '<|im_system|>tool_declare<|im_middle|>[{"type": "function", "function": '
        '{"name": "get_weather", "parameters": {}}}]<|im_end|>'
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>hi<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>hello<|im_end|>"
        "<|im_user|>user<|im_middle|>weather?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>need tool</think>"
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "巴黎"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\nsunny<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    assert out == render_jinja_template(official, msgs, tools=tools)


def test_checkpoint_template_path_matches_native(official: str) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "{{ x }}"}]
    assert apply_chat_template(msgs, chat_template=official) == apply_chat_template(msgs)


def test_jinja_environment_is_hugging_face_like() -> None:
    src = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}\n{% endfor %}{{ tools | tojson }}"
    )
    msgs = [{"z": "<&>'é", "a": 1}, {"never": True}]
    out = render_jinja_template(src, msgs, tools=None)
    assert out == '{"z": "<&>\'é", "a": 1}\nnull'
    with pytest.raises(jinja2.TemplateError, match="boom"):
        render_jinja_template("{{ raise_exception('boom') }}", [])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_jinja_template("{% set _ = messages.append(1) %}", [])


@pytest.mark.parametrize(
    "bad",
    [
        ["not a dict"],
        [{"content": "no role"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": ["part as str"]}],
        [{"role": "assistant", "tool_calls": [{"id": "x"}]}],
    ],
)
def test_bad_messages_raise_typed_error(bad: list[Any]) -> None:
    with pytest.raises(ChatTemplateError) as info:
        apply_chat_template(bad)
    assert info.value.value is not None
