"""Grammar-constrained decoding with random logits: the output must always parse and validate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from k2serve.chat.bpe_train import write_tokenizer
from k2serve.chat.parsers import ToolCallParser
from k2serve.chat.structured import (
    GrammarCompiler,
    GrammarConstraint,
    GrammarViolation,
    StructuredOutputError,
    response_format_grammar,
    tool_choice_grammar,
)
from k2serve.chat.tokenizer import KimiTokenizer, load_tokenizer

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
SEARCH = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "maxLength": 16},
        "filters": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["query"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "search", "parameters": SEARCH}},
]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> KimiTokenizer:
    out: Path = tmp_path_factory.mktemp("tok")
    write_tokenizer(out, 1024)
    return load_tokenizer(out)


@pytest.fixture(scope="module")
def compiler(tok: KimiTokenizer) -> GrammarCompiler:
    return GrammarCompiler(tok)


def sample_until_done(
    constraint: GrammarConstraint, vocab: int, seed: int, max_steps: int = 3000
) -> list[int]:
    """Random logits (a random-weight model's stand-in), masked, sampled until termination."""
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(max_steps):
        mask = constraint.allowed_mask(vocab)
        assert mask.any(), "the grammar left no token allowed"
        logits = torch.randn(vocab, generator=gen).masked_fill(~mask, float("-inf"))
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        constraint.accept(token)
        ids.append(token)
        if constraint.is_terminated():
            return ids
    raise AssertionError(f"not terminated after {max_steps} tokens")


@pytest.mark.parametrize("seed", range(6))
def test_required_tool_choice_always_parses_and_validates(
    tok: KimiTokenizer, compiler: GrammarCompiler, seed: int
) -> None:
    constraint = compiler.for_tool_choice(TOOLS, "required")
    assert constraint is not None
    ids = sample_until_done(constraint, tok.vocab_size + 64, seed)  # padded lm_head rows
    assert ids[-1] == tok.eos_id
    text = tok.decode(ids[:-1])
    assert text.startswith("<|tool_calls_section_begin|>") and text.endswith("<|tool_calls_section_end|>")
    out = ToolCallParser(tool_names=SCHEMAS).parse(text)
    assert out.content == "" and out.tool_calls
    for call in out.tool_calls:
        assert call.complete and call.known and call.valid_arguments
        assert call.id.startswith(f"functions.{call.name}:")
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


@pytest.mark.parametrize("seed", range(3))
def test_named_tool_choice_forces_one_call(tok: KimiTokenizer, compiler: GrammarCompiler, seed: int) -> None:
    choice = {"type": "function", "function": {"name": "search"}}
    constraint = compiler.for_tool_choice(TOOLS, choice)
    assert constraint is not None
    ids = sample_until_done(constraint, tok.vocab_size, seed)
    (call,) = ToolCallParser().parse(tok.decode(ids[:-1])).tool_calls
    assert call.name == "search"
    jsonschema.validate(json.loads(call.arguments), SEARCH)


@pytest.mark.parametrize("seed", range(3))
def test_response_format_json_schema_and_object(
    tok: KimiTokenizer, compiler: GrammarCompiler, seed: int
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
    constraint = compiler.for_response_format(fmt)
    assert constraint is not None
    ids = sample_until_done(constraint, tok.vocab_size, seed)
    jsonschema.validate(json.loads(tok.decode(ids[:-1])), WEATHER)

    constraint = compiler.for_response_format({"type": "json_object"})
    assert constraint is not None
    ids = sample_until_done(constraint, tok.vocab_size, seed + 100, max_steps=6000)
    assert isinstance(json.loads(tok.decode(ids[:-1])), dict)


def test_reasoning_prefix_is_accepted(tok: KimiTokenizer, compiler: GrammarCompiler) -> None:
    constraint = compiler.for_tool_choice(TOOLS, "required", allow_reasoning=True)
    assert constraint is not None
    args = json.dumps({"city": "Paris", "unit": "celsius"})
    text = (
        "<think>I should check the weather.</think><|tool_calls_section_begin|><|tool_call_begin|>"
        f"functions.get_weather:0<|tool_call_argument_begin|>{args}<|tool_call_end|>"
        "<|tool_calls_section_end|><|im_end|>"
    )
    for token in tok.encode(text):
        assert constraint.allowed_mask(tok.vocab_size)[token]
        constraint.accept(token)
    assert constraint.is_terminated()


def test_bitmask_matches_bool_mask(tok: KimiTokenizer, compiler: GrammarCompiler) -> None:
    constraint = compiler.for_response_format({"type": "json_object"})
    assert constraint is not None
    bitmask = torch.full((2, (tok.vocab_size + 31) // 32), -1, dtype=torch.int32)
    constraint.fill_bitmask(bitmask, row=1)
    words = bitmask[1].view(torch.uint8)  # little-endian bytes of each word
    bits = ((words.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1).bool()
    assert torch.equal(bits[: tok.vocab_size], constraint.allowed_mask(tok.vocab_size))
    assert (bitmask[0] == -1).all()


def test_forbidden_token_raises(tok: KimiTokenizer, compiler: GrammarCompiler) -> None:
    constraint = compiler.for_tool_choice(TOOLS, "required")
    assert constraint is not None
    bad = tok.encode("hello")[0]
    with pytest.raises(GrammarViolation) as info:
        constraint.accept(bad)
    assert info.value.value == bad


def test_requests_without_constraint_and_bad_requests(compiler: GrammarCompiler) -> None:
    assert tool_choice_grammar(TOOLS, "none") is None
    assert tool_choice_grammar(TOOLS, None) is None
    assert response_format_grammar(None) is None
    assert response_format_grammar({"type": "text"}) is None
    bad: list[Any] = [
        lambda: tool_choice_grammar(TOOLS, {"type": "function", "function": {"name": "nope"}}),
        lambda: tool_choice_grammar([], "required"),
        lambda: tool_choice_grammar([{"type": "function", "function": {"name": "bad name"}}], "required"),
        lambda: tool_choice_grammar(TOOLS, "sometimes"),
        lambda: response_format_grammar({"type": "yaml"}),
        lambda: response_format_grammar({"type": "json_schema", "json_schema": {}}),
        lambda: compiler.from_lark("start: <|no_such_token|>"),
    ]
    for make in bad:
        with pytest.raises(StructuredOutputError):
            make()
