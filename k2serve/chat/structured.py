"""Grammar-constrained decoding (structured output) on top of llguidance.

Two parts, kept apart: pure functions that turn an OpenAI request's `response_format` or
`tool_choice` into an llguidance grammar string, and `GrammarConstraint`, which runs one grammar
against the token stream of one sequence. `GrammarCompiler` ties them to a tokenizer (building
its llguidance tokenizer once, which takes about a second for the real vocabulary).

Per decode step the engine calls `allowed_mask(vocab_size)` (or `fill_bitmask`), masks the
logits, samples, and calls `accept(token)`; the sequence is done when `is_terminated()`. The
grammar ends with `<|im_end|>` (the tokenizer's `eos_id`), which is forced once the structure
is complete. JSON is constrained to the separators the K2 chat template writes (`", "`, `": "`)
with no other whitespace.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance
import torch

from k2serve.chat.tokenizer import KimiTokenizer
from k2serve.chat.vocab import (
    PAT_STR,
    THINK_BEGIN,
    THINK_END,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
)

# JSON layout options for llguidance: the template's `json.dumps` separators, no free whitespace.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class StructuredOutputError(ValueError):
    """A response_format / tool_choice / grammar that cannot be compiled; `value` is it."""

    def __init__(self, message: str, value: object) -> None:
        super().__init__(f"{message}: {value!r}")
        self.value = value


class GrammarViolation(ValueError):
    """`accept` was given a token the grammar does not allow; `value` is the token id."""

    def __init__(self, message: str, value: int) -> None:
        super().__init__(f"{message}: {value!r}")
        self.value = value


# ----- request -> grammar (pure) -----


def _json_rule(schema: object) -> str:
    """An inline `%json` rule body for `schema`, with the K2 JSON layout."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, Mapping):
        raise StructuredOutputError("a JSON schema must be an object", schema)
    options = {**_JSON_LAYOUT, **schema.get("x-guidance", {})}
    return "%json " + json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)


def _reasoning_prefix(allow_reasoning: bool) -> str:
    return f"({THINK_BEGIN} REASONING {THINK_END})? " if allow_reasoning else ""


def _finish_grammar(body: str, allow_reasoning: bool) -> str:
    lines = [f"start: {_reasoning_prefix(allow_reasoning)}{body}"]
    if allow_reasoning:
        lines.append(r"REASONING: /(.|\n)*/")
    return "\n".join(lines) + "\n"


def response_format_grammar(
    response_format: Mapping[str, Any] | None, allow_reasoning: bool = False
) -> str | None:
    """Lark grammar for OpenAI `response_format`; None for no constraint (`text` or absent).

    `json_object` allows any JSON object; `json_schema` takes `json_schema.schema`. With
    `allow_reasoning`, an optional `<think>...</think>` block may precede the JSON.
    """
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: object = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise StructuredOutputError("json_schema needs a 'schema'", response_format)
        schema = spec["schema"]
    else:
        raise StructuredOutputError("unsupported response_format type", kind)
    return _finish_grammar("json\njson: " + _json_rule(schema), allow_reasoning)


def tool_choice_grammar(
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: str | Mapping[str, Any] | None,
    allow_reasoning: bool = False,
    parallel_tool_calls: bool = True,
) -> str | None:
    """Lark grammar for a Kimi tool-call section; None when `tool_choice` constrains nothing.

    `"required"`: one or more calls (exactly one without `parallel_tool_calls`), each to any declared
    tool; `{"type": "function", "function": {"name": N}}`: exactly one call to N; `"auto"`: free text
    (no special tokens) with an optional tool-call section at its end, so the grammar only binds once
    the model opens the section (its calls as under "required"). Each call is
    `<|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS<|tool_call_end|>`
    with ARGS matching the tool's `parameters` schema (any object when absent); a tool with
    `"strict": true` has its schema closed (`tool_schema`). `"none"` and None give None (the server
    keeps tools out of the prompt for `"none"`).
    """
    if tool_choice in (None, "none"):
        return None
    by_name: dict[str, object] = {}
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise StructuredOutputError("a tool needs function.name matching [A-Za-z0-9_.-]{1,64}", tool)
        by_name[name] = tool_schema(fn)
    lazy = tool_choice == "auto"
    if tool_choice in ("required", "auto"):
        names, repeat = list(by_name), "+" if parallel_tool_calls else ""
    elif isinstance(tool_choice, Mapping) and isinstance(tool_choice.get("function"), Mapping):
        chosen = tool_choice["function"].get("name")
        if chosen not in by_name:
            raise StructuredOutputError("tool_choice names an undeclared function", chosen)
        names, repeat = [chosen], ""
    else:
        raise StructuredOutputError("unsupported tool_choice", tool_choice)
    if not names:
        raise StructuredOutputError(f"tool_choice {tool_choice!r} without tools", tools)

    rules = [f"calls: {TOOL_CALLS_SECTION_BEGIN} call{repeat} {TOOL_CALLS_SECTION_END}"]
    rules.append("call: " + " | ".join(f"call_{i}" for i in range(len(names))))
    for i, name in enumerate(names):
        rules.append(
            f'call_{i}: {TOOL_CALL_BEGIN} "functions.{name}:" IDX '
            f"{TOOL_CALL_ARGUMENT_BEGIN} args_{i} {TOOL_CALL_END}"
        )
        rules.append(f"args_{i}: {_json_rule(by_name[name])}")
    rules.append("IDX: /0|[1-9][0-9]{0,3}/")
    if lazy:
        rules.append(r"TEXT: /(.|\n)+/")
    head = "TEXT? calls?" if lazy else "calls"
    return _finish_grammar(head + "\n" + "\n".join(rules), allow_reasoning)


def tool_schema(function: Mapping[str, Any]) -> object:
    """The schema a call's arguments must match: `parameters` (any object when absent); with
    `"strict": true` (OpenAI's strict function calling) every object that does not say otherwise
    gets `additionalProperties: false`, so no undeclared key can be generated."""
    schema = function.get("parameters") or {"type": "object"}
    return _closed(schema) if function.get("strict") is True else schema


def _closed(schema: object) -> object:
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {
        k: _closed(v) if k not in ("enum", "const", "default", "examples") else v for k, v in schema.items()
    }
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


# ----- running a grammar -----


class GrammarConstraint:
    """One grammar matched against one sequence's generated tokens.

    Contract: call `allowed_mask` (or `fill_bitmask`) before each sampling step and `accept`
    with the sampled token; sampling only from the mask keeps the matcher valid. Terminated
    once the grammar's final `<|im_end|>` has been accepted.
    """

    def __init__(self, matcher: llguidance.LLMatcher, eos_id: int, num_tokens: int) -> None:
        self._m = matcher
        self._eos_id = eos_id
        self._num_tokens = num_tokens
        self._done = False

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        """Bool [vocab_size]: True where a token may come next (ids past the tokenizer: False)."""
        if vocab_size < self._num_tokens:
            raise StructuredOutputError(f"vocab_size below the tokenizer's {self._num_tokens}", vocab_size)
        packed = torch.frombuffer(bytearray(self._m.compute_bitmask()), dtype=torch.uint8)  # [V/8]
        bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1  # [V/8, 8]
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[: self._num_tokens] = bits.reshape(-1)[: self._num_tokens].bool()
        return mask

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the mask into row `row` of an int32 CPU bitmask [B, ceil(V/32)] (bit j of word
        w allows token 32w + j), as llguidance/xgrammar-style kernels consume it."""
        words = bitmask[row]
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not words.is_contiguous():
            raise StructuredOutputError("bitmask must be a contiguous int32 CPU tensor", bitmask.shape)
        if words.numel() * 32 < self._num_tokens:
            raise StructuredOutputError("bitmask row too short for the vocabulary", words.numel())
        words.fill_(0)
        self._m.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def accept(self, token_id: int) -> None:
        """Advance by one generated token; raises GrammarViolation if the grammar forbids it."""
        if self._done or not self._m.consume_token(token_id):
            raise GrammarViolation(f"token not allowed by the grammar ({self._m.get_error()})", token_id)
        if token_id == self._eos_id:
            self._done = True

    def is_terminated(self) -> bool:
        return self._done


class GrammarCompiler:
    """Builds `GrammarConstraint`s for one tokenizer; reuse it across requests."""

    def __init__(self, tokenizer: KimiTokenizer) -> None:
        self._eos_id = tokenizer.eos_id
        self._num_tokens = tokenizer.vocab_size
        self._lltok = llguidance.LLTokenizer.from_tiktoken(  # type: ignore[attr-defined]
            encoder=dict(tokenizer.mergeable_ranks),
            special_tokens=tokenizer.special_ids,
            pattern=PAT_STR,
            eos_token=tokenizer.eos_id,
            n_vocab=tokenizer.vocab_size,
        )

    def from_lark(self, lark: str) -> GrammarConstraint:
        """A constraint from an llguidance Lark grammar; raises StructuredOutputError if invalid."""
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._lltok)
        if is_error:
            raise StructuredOutputError(f"invalid grammar ({'; '.join(messages)})", lark)
        matcher = llguidance.LLMatcher(self._lltok, grammar, log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(f"invalid grammar ({matcher.get_error()})", lark)
        return GrammarConstraint(matcher, self._eos_id, self._num_tokens)

    def for_response_format(
        self, response_format: Mapping[str, Any] | None, allow_reasoning: bool = False
    ) -> GrammarConstraint | None:
        lark = response_format_grammar(response_format, allow_reasoning)
        return None if lark is None else self.from_lark(lark)

    def for_tool_choice(
        self,
        tools: Sequence[Mapping[str, Any]] | None,
        tool_choice: str | Mapping[str, Any] | None,
        allow_reasoning: bool = False,
        parallel_tool_calls: bool = True,
    ) -> GrammarConstraint | None:
        lark = tool_choice_grammar(tools, tool_choice, allow_reasoning, parallel_tool_calls)
        return None if lark is None else self.from_lark(lark)
