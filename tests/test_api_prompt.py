"""PromptEncoder: message text never becomes special tokens, ordinary prompts encode exactly as before,
and the ids always decode back to the rendered prompt (native renderer and the official Jinja template)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2serve.chat.bpe_train import write_tokenizer
from k2serve.chat.prompt import ESC, PromptEncoder
from k2serve.chat.template import apply_chat_template
from k2serve.chat.tokenizer import KimiTokenizer, load_tokenizer

OFFICIAL = (
    Path(__file__).resolve().parents[2] / "shared" / "reference" / "kimi-k2-thinking.chat_template.jinja"
)
PIECES = [
    "<|im_end|>",
    "<|im_",
    "end|>",
    "<",
    ">",
    "|>",
    "<think>",
    "</think",
    "think>",
    "[EOS]",
    "[E",
    "OS]",
    "<|tool_call_begin|>",
    "<|reserved_token_1100|>",
    ESC,
    "\U000f0002",
    "\U000f0300",
    "a",
    " ",
    "\n",
    "é",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> KimiTokenizer:
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out, 1024)
    return load_tokenizer(out)


def template_source() -> str | None:
    return OFFICIAL.read_text() if OFFICIAL.exists() else None


hostile = st.lists(st.sampled_from(PIECES) | st.text(max_size=4), max_size=8).map("".join)
benign = st.text(st.characters(codec="utf-8", exclude_characters="<>[]|\U0010fffd"), max_size=40)


def conversation(text: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[list[dict[str, Any]], list[Any]]]:
    call = st.fixed_dictionaries(
        {
            "id": text,
            "type": st.just("function"),
            "function": st.fixed_dictionaries({"name": text, "arguments": text}),
        }
    )
    message = st.one_of(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user"]), "content": text}, optional={"name": text}
        ),
        st.fixed_dictionaries(
            {"role": st.just("assistant"), "content": text},
            optional={"reasoning_content": text, "tool_calls": st.lists(call, min_size=1, max_size=2)},
        ),
        st.fixed_dictionaries({"role": st.just("tool"), "content": text, "tool_call_id": text}),
        st.fixed_dictionaries(
            {
                "role": st.just("user"),
                "content": st.lists(
                    st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=3
                ),
            }
        ),
    )
    tool = st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {
                    "name": text,
                    "description": text,
                    "parameters": st.dictionaries(text, st.just({"type": "string"}), max_size=2),
                }
            ),
        }
    )
    return st.tuples(st.lists(message, min_size=1, max_size=4), st.lists(tool, max_size=2))


def blank(value: Any, key: str | None = None) -> Any:
    """The same conversation with every free-text value replaced by "x" (roles and types kept)."""
    if isinstance(value, dict):
        return {("k" if key == "parameters" else k): blank(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [blank(v, key) for v in value]
    if isinstance(value, str) and key not in ("role", "type"):
        return "x"
    return value


SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(conv=conversation(hostile), use_official=st.booleans())
def test_only_the_template_makes_special_tokens(tok: KimiTokenizer, conv: Any, use_official: bool) -> None:
    messages, tools = conv
    source = template_source() if use_official else None
    enc = PromptEncoder(tok)
    ids = enc.encode_chat(messages, tools, source)
    reference = enc.encode_chat(blank(messages), blank(tools), source)
    assert [t for t in ids if tok.is_special(t)] == [t for t in reference if tok.is_special(t)]
    assert tok.decode(ids) == apply_chat_template(messages, tools, chat_template=source)


@SETTINGS
@given(conv=conversation(benign), use_official=st.booleans())
def test_ordinary_prompts_encode_as_the_plain_tokenizer_does(
    tok: KimiTokenizer, conv: Any, use_official: bool
) -> None:
    messages, tools = conv
    source = template_source() if use_official else None
    rendered = apply_chat_template(messages, tools, chat_template=source)
    assert PromptEncoder(tok).encode_chat(messages, tools, source) == tok.encode(rendered)


def test_split_special_names_and_escape_characters(tok: KimiTokenizer) -> None:
    enc = PromptEncoder(tok)
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "a<|im_"}, {"type": "text", "text": "end|>b"}]},
        {"role": "user", "content": f"{ESC}\U000f0002 and <|im_end|>", "name": "<think>"},
    ]
    ids = enc.encode_chat(msgs)
    assert tok.decode(ids) == apply_chat_template(msgs)
    assert ids.count(tok.eos_id) == 3  # the default system turn and the two user turns
    assert enc.escape({"role": "user", "content": "plain"}) == {"role": "user", "content": "plain"}
    assert enc.unescape(enc.escape("x<|im_end|>" + ESC + "<")) == "x<|im_end|>" + ESC + "<"
