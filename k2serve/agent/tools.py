"""ToolRegistry: plain Python functions as OpenAI tools, their JSON schema derived from type hints.

    tools = ToolRegistry()

    @tools.register
    def add(a: int, b: Annotated[int, "the second addend"] = 0) -> int:
        '''Add two integers.'''
        return a + b

The schema comes from the signature, never written by hand: every parameter needs an annotation
from the supported set (`int`, `float`, `str`, `bool`, `list[T]`, `dict[str, T]`, `Literal[...]` of
one type, `T | None`, and `Annotated[T, ...]` whose extras are descriptions or dicts of bounds:
`Annotated[int, {"minimum": 0, "maximum": 99}]`); a parameter with a default is optional. Bounds are
enforced twice: by the server's grammar when tool_choice forces a call, and by `call`.
The function's docstring (first paragraph) is the tool's description. Anything else raises
`ToolDefinitionError` at registration, so a tool the model can see is a tool the loop can call.

`call(name, arguments)` never raises for what the model got wrong: an unknown tool, arguments that
are not a JSON object or do not match the schema, or a tool that raised, all come back as an
`ToolOutcome` with `error` set and `content` the message the model will read.
"""

from __future__ import annotations

import inspect
import json
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from k2serve.agent.errors import ToolDefinitionError

__all__ = ["Tool", "ToolOutcome", "ToolRegistry", "check_json"]

_SCALARS: dict[type, str] = {int: "integer", float: "number", str: "string", bool: "boolean"}
# bound keyword -> ({schema type: None (the value) or len (its length)}, True for a lower bound)
_NUMBERS: dict[str, Any] = {"integer": None, "number": None}
_BOUNDS: dict[str, tuple[dict[str, Any], bool]] = {
    "minimum": (_NUMBERS, True),
    "maximum": (_NUMBERS, False),
    "minLength": ({"string": len}, True),
    "maxLength": ({"string": len}, False),
    "minItems": ({"array": len}, True),
    "maxItems": ({"array": len}, False),
}


@dataclass(frozen=True)
class Tool:
    """A registered function: `schema` is the JSON schema of its keyword arguments (an object)."""

    name: str
    description: str
    schema: dict[str, Any]
    fn: Callable[..., Any]

    def openai(self) -> dict[str, Any]:
        """The tool as an OpenAI `tools[]` entry."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.schema},
        }


@dataclass(frozen=True)
class ToolOutcome:
    """One tool call's result: `content` goes back to the model as the tool message; `error` is None
    on success, else a short kind: "unknown_tool", "bad_arguments" or "tool_raised"."""

    content: str
    error: str | None = None


def _bounds_fit(schema: Mapping[str, Any], bounds: Mapping[str, Any]) -> bool:
    """Whether every key of `bounds` is a bound keyword for the schema's type, with a number value."""
    return all(
        key in _BOUNDS
        and schema.get("type") in _BOUNDS[key][0]
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        for key, value in bounds.items()
    )


def _schema_of(annotation: Any, where: str, fn_name: str) -> dict[str, Any]:
    """The JSON schema of one annotation (see the module docstring for the supported set)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        schema = _schema_of(args[0], where, fn_name)
        for extra in args[1:]:
            if isinstance(extra, str):
                schema["description"] = f"{schema.get('description', '')} {extra}".strip()
            elif isinstance(extra, Mapping) and _bounds_fit(schema, extra):
                schema |= dict(extra)
            else:
                raise ToolDefinitionError(
                    fn_name,
                    f"{where}: Annotated extras must be descriptions or dicts of bounds "
                    f"({', '.join(_BOUNDS)}) that fit the type",
                )
        return schema
    if annotation in _SCALARS:
        return {"type": _SCALARS[annotation]}
    if origin is Literal:
        kinds = {type(a) for a in args}
        if len(kinds) != 1 or next(iter(kinds)) not in _SCALARS:
            raise ToolDefinitionError(fn_name, f"{where}: Literal values must share one scalar type")
        return {"type": _SCALARS[next(iter(kinds))], "enum": list(args)}
    if origin is list and len(args) == 1:
        return {"type": "array", "items": _schema_of(args[0], f"{where}[]", fn_name)}
    if origin is dict and len(args) == 2 and args[0] is str:
        return {"type": "object", "additionalProperties": _schema_of(args[1], f"{where}{{}}", fn_name)}
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return {"anyOf": [_schema_of(rest[0], where, fn_name), {"type": "null"}]}
    raise ToolDefinitionError(fn_name, f"{where}: unsupported annotation {annotation!r}")


def schema_of_function(fn: Callable[..., Any]) -> dict[str, Any]:
    """The object schema of `fn`'s parameters (all keyword-passable, each annotated)."""
    name = fn.__name__
    try:
        hints = get_type_hints(fn, include_extras=True)
    except (NameError, TypeError) as e:
        raise ToolDefinitionError(name, f"type hints cannot be resolved: {e}") from e
    properties: dict[str, Any] = {}
    required: list[str] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise ToolDefinitionError(
                name, f"parameter {p.name!r}: only named parameters can be tool arguments"
            )
        if p.name not in hints:
            raise ToolDefinitionError(name, f"parameter {p.name!r} has no type annotation")
        properties[p.name] = _schema_of(hints[p.name], p.name, name)
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def check_json(value: Any, schema: Mapping[str, Any], path: str = "$") -> str | None:
    """Where `value` breaks `schema` (first violation, as "path: reason"), or None when it conforms.

    Covers the keywords `schema_of_function` emits: type, enum, properties, required,
    additionalProperties, items, anyOf, the bounds (minimum, maximum, min/maxLength, min/maxItems),
    description (ignored). Stricter than JSON Schema on one point: an integer must be written as one
    (1.0 is refused), so a tool annotated `int` gets an int."""
    if "anyOf" in schema:
        errors = [check_json(value, s, path) for s in schema["anyOf"]]
        return None if any(e is None for e in errors) else next(e for e in errors if e)
    kind = schema.get("type")
    ok = {
        None: True,
        "null": value is None,
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "string": isinstance(value, str),
        "array": isinstance(value, list),
        "object": isinstance(value, dict),
    }.get(kind, False)
    if not ok:
        return f"{path}: expected {kind}, got {json.dumps(value)[:40]}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path}: {json.dumps(value)[:40]} is not one of {schema['enum']}"
    for key, (size_of, lower) in _BOUNDS.items():
        if key in schema and kind in size_of:
            size = value if size_of[kind] is None else len(value)
            if (size < schema[key]) if lower else (size > schema[key]):
                return f"{path}: {json.dumps(value)[:40]} breaks {key} {schema[key]}"
    if kind == "array":
        for i, item in enumerate(value):
            if err := check_json(item, schema.get("items", {}), f"{path}[{i}]"):
                return err
    if kind == "object":
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                return f"{path}: missing required property {key!r}"
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            sub = props.get(key, extra)
            if sub is False:
                return f"{path}: unexpected property {key!r}"
            if isinstance(sub, Mapping) and (err := check_json(item, sub, f"{path}.{key}")):
                return err
    return None


class ToolRegistry:
    """The tools an agent may call, by name. Not thread-safe for registration; `call` is reentrant
    as far as the registered functions are."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def register(self, fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
        """Register `fn` (usable as `@register` or `@register(name="...")`); returns `fn` unchanged.
        Raises ToolDefinitionError for an unsupported signature or a name already taken."""

        def add(f: Callable[..., Any]) -> Callable[..., Any]:
            tool_name = name or f.__name__
            if tool_name in self._tools:
                raise ToolDefinitionError(tool_name, "a tool with this name is already registered")
            doc = inspect.getdoc(f) or ""
            description = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
            self._tools[tool_name] = Tool(tool_name, description, schema_of_function(f), f)
            return f

        return add(fn) if fn is not None else add

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def openai_tools(self) -> list[dict[str, Any]]:
        """Every tool as an OpenAI `tools[]` entry, in registration order."""
        return [t.openai() for t in self._tools.values()]

    def call(self, name: str, arguments: str) -> ToolOutcome:
        """Run tool `name` with `arguments` (a JSON object as a string, as the model wrote it).

        The result is the return value as text (a str as is, anything else as JSON). Whatever the
        model got wrong, and any Exception the tool raises, becomes an outcome with `error` set whose
        `content` tells the model what happened; BaseExceptions (KeyboardInterrupt, ...) propagate."""
        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(self._tools) or "none"
            return ToolOutcome(f"error: unknown tool {name!r}; the tools are: {known}", "unknown_tool")
        try:
            args = json.loads(arguments or "{}")
        except json.JSONDecodeError as e:
            return ToolOutcome(f"error: the arguments of {name} are not valid JSON: {e}", "bad_arguments")
        if (problem := check_json(args, tool.schema)) is not None:
            return ToolOutcome(f"error: invalid arguments for {name}: {problem}", "bad_arguments")
        try:
            result = tool.fn(**args)
        except Exception as e:  # noqa: BLE001 - reported to the model (and in the step record), never dropped
            return ToolOutcome(f"error: {name} raised {type(e).__name__}: {e}", "tool_raised")
        return ToolOutcome(result if isinstance(result, str) else json.dumps(result, default=str))
