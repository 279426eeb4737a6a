"""ToolRegistry: schemas derived from type hints, the argument check against jsonschema (the reference),
and every way a model's tool call can go wrong coming back as a result, never as an exception."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import jsonschema
import pytest

from k2serve.agent import ToolDefinitionError, ToolRegistry
from k2serve.agent.tools import check_json, schema_of_function


def sample(
    n: int,
    x: float,
    name: Annotated[str, "who", {"maxLength": 5}],
    flag: bool,
    tags: list[str],
    scores: dict[str, int],
    mode: Literal["fast", "slow"] = "fast",
    note: str | None = None,
    small: Annotated[int, {"minimum": 0, "maximum": 9}] = 0,
) -> str:
    return "ok"


def test_schema_from_type_hints() -> None:
    s = schema_of_function(sample)
    assert s["required"] == ["n", "x", "name", "flag", "tags", "scores"]
    assert s["additionalProperties"] is False
    p = s["properties"]
    assert p["n"] == {"type": "integer"} and p["x"] == {"type": "number"} and p["flag"] == {"type": "boolean"}
    assert p["name"] == {"type": "string", "description": "who", "maxLength": 5}
    assert p["tags"] == {"type": "array", "items": {"type": "string"}}
    assert p["scores"] == {"type": "object", "additionalProperties": {"type": "integer"}}
    assert p["mode"] == {"type": "string", "enum": ["fast", "slow"]}
    assert p["note"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert p["small"] == {"type": "integer", "minimum": 0, "maximum": 9}
    jsonschema.Draft202012Validator.check_schema(s)


GOOD = {"n": 1, "x": 2, "name": "ab", "flag": True, "tags": ["a"], "scores": {"a": 1}}
CASES: list[Any] = [
    GOOD,
    GOOD | {"mode": "slow", "note": None, "small": 9, "x": 1.5},
    GOOD | {"n": "1"},
    GOOD | {"n": True},
    GOOD | {"n": 1.5},
    GOOD | {"x": "2"},
    GOOD | {"name": "toolong"},
    GOOD | {"flag": 1},
    GOOD | {"tags": ["a", 2]},
    GOOD | {"tags": "a"},
    GOOD | {"scores": {"a": "b"}},
    GOOD | {"mode": "medium"},
    GOOD | {"note": 3},
    GOOD | {"small": -1},
    GOOD | {"small": 10},
    GOOD | {"extra": 1},
    {k: v for k, v in GOOD.items() if k != "flag"},
    [],
    "x",
    None,
]


@pytest.mark.parametrize("value", CASES)
def test_check_json_agrees_with_jsonschema(value: Any) -> None:
    schema = schema_of_function(sample)
    reference = jsonschema.Draft202012Validator(schema).is_valid(value)
    assert (check_json(value, schema) is None) == reference, check_json(value, schema)


def test_register_and_call() -> None:
    tools = ToolRegistry()

    @tools.register
    def add(a: int, b: int = 2) -> int:
        """Add two integers.

        Details the model does not need."""
        return a + b

    @tools.register(name="echo")
    def _echo(text: str) -> str:
        return text

    @tools.register
    def pair(a: int) -> dict[str, int]:
        return {"a": a}

    assert add(1) == 3  # register returns the function unchanged
    assert [t["function"]["name"] for t in tools.openai_tools()] == ["add", "echo", "pair"]
    assert tools.openai_tools()[0]["function"]["description"] == "Add two integers."
    assert "add" in tools and len(tools) == 3
    assert tools.call("add", '{"a": 1}').content == "3"
    assert tools.call("echo", '{"text": "hi"}').content == "hi"  # a str as is
    assert json.loads(tools.call("pair", '{"a": 4}').content) == {"a": 4}  # anything else as JSON
    assert tools.call("add", '{"a": 1, "b": 5}').error is None


def test_model_mistakes_come_back_as_results() -> None:
    tools = ToolRegistry()

    @tools.register
    def add(a: int, b: int) -> int:
        return a + b

    @tools.register
    def boom(reason: str) -> str:
        raise ValueError(f"exploded: {reason}")

    unknown = tools.call("mul", '{"a": 1}')
    assert unknown.error == "unknown_tool" and "'mul'" in unknown.content and "add, boom" in unknown.content
    bad_json = tools.call("add", '{"a": 1, "b": ')
    assert bad_json.error == "bad_arguments" and "not valid JSON" in bad_json.content
    not_object = tools.call("add", "[1, 2]")
    assert not_object.error == "bad_arguments" and "expected object" in not_object.content
    wrong_type = tools.call("add", '{"a": "1", "b": 2}')
    assert wrong_type.error == "bad_arguments" and "$.a" in wrong_type.content
    missing = tools.call("add", '{"a": 1}')
    assert missing.error == "bad_arguments" and "'b'" in missing.content
    raised = tools.call("boom", '{"reason": "test"}')
    assert raised.error == "tool_raised" and raised.content == "error: boom raised ValueError: exploded: test"


def test_base_exceptions_propagate() -> None:
    tools = ToolRegistry()

    @tools.register
    def stop() -> str:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tools.call("stop", "{}")


def no_hint(a) -> int:  # noqa: ANN001
    return a


def var_args(*a: int) -> int:
    return 0


def var_kwargs(**a: int) -> int:
    return 0


def tuple_arg(a: tuple[int, int]) -> int:
    return 0


def bad_bound(a: Annotated[int, {"maxLength": 3}]) -> int:
    return a


def mixed_literal(a: Literal[1, "x"]) -> int:
    return 0


def non_str_keys(a: dict[int, int]) -> int:
    return 0


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (no_hint, "no type annotation"),
        (var_args, "only named parameters"),
        (var_kwargs, "only named parameters"),
        (tuple_arg, "unsupported annotation"),
        (bad_bound, "bounds"),
        (mixed_literal, "Literal"),
        (non_str_keys, "unsupported annotation"),
    ],
)
def test_unsupported_signatures_are_refused(fn: Any, reason: str) -> None:
    with pytest.raises(ToolDefinitionError, match=reason) as e:
        ToolRegistry().register(fn)
    assert e.value.name == fn.__name__


def test_duplicate_name_is_refused() -> None:
    tools = ToolRegistry()
    tools.register(sample)
    with pytest.raises(ToolDefinitionError, match="already registered"):
        tools.register(sample)
