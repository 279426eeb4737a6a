"""An OpenAI Responses request -> the one chat request (`k2serve.chat.request.plan_chat`'s inputs).

What maps to what:
- `input` as a string -> one user message; as items: `message` items (roles user, system, developer,
  assistant; content a string or `input_text` / `output_text` parts) -> messages; `function_call`
  items -> `tool_calls` of an assistant message (consecutive calls join one message); a
  `function_call_output` -> a tool message; a `reasoning` item (its `reasoning_text` content, else its
  summary) -> the `reasoning_content` of the assistant message that follows it;
- `instructions` -> a leading system message, for this request only (not carried over by
  `previous_response_id`, as OpenAI specifies);
- function `tools` ({name, description, parameters, strict}) -> chat tools; other tool types are refused;
- `tool_choice` "none" / "auto" / "required" / {"type": "function", "name"} -> the chat forms;
- `text.format` (text, json_object, json_schema {name, schema, strict}) -> response_format;
- `max_output_tokens`, `temperature`, `top_p` -> sampling.
Images, files and item references are refused with a 400 naming the item (OpenAI's error shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from k2serve.api.errors import APIError, bad_request
from k2serve.api.schemas import SamplingFields

Message = dict[str, Any]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ResponsesRequest(_Body):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    store: bool = True
    stream: bool = False
    metadata: dict[str, str] | None = None
    reasoning: dict[str, Any] | None = None


@dataclass(frozen=True)
class ChatInputs:
    """What `plan_chat` takes, in the chat API's shapes; `messages` are this request's new ones."""

    instructions: Message | None
    messages: list[Message]
    tools: list[dict[str, Any]] | None
    tool_choice: str | dict[str, Any] | None
    response_format: dict[str, Any] | None


def chat_inputs(req: ResponsesRequest) -> ChatInputs:
    instructions = None if req.instructions is None else {"role": "system", "content": req.instructions}
    messages = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else _items(req.input)
    if not messages:
        raise bad_request("input is empty: at least one input item is required", "input")
    tools = [_tool(t, i) for i, t in enumerate(req.tools)] if req.tools else None
    return ChatInputs(instructions, messages, tools, _tool_choice(req.tool_choice), _format(req.text))


def sampling_fields(req: ResponsesRequest, model: str) -> SamplingFields:
    return SamplingFields(model=model, temperature=req.temperature, top_p=req.top_p)


def _items(items: list[dict[str, Any]]) -> list[Message]:
    out: list[Message] = []
    reasoning: str | None = None  # a reasoning item waiting for its assistant message
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        where = f"input[{i}]"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(
                    f"{where}.role {role!r} is not user, system, developer or assistant", f"{where}.role"
                )
            message: Message = {"role": role, "content": _text(item.get("content"), f"{where}.content")}
            if role == "assistant" and reasoning is not None:
                message["reasoning_content"], reasoning = reasoning, None
            out.append(message)
        elif kind == "function_call":
            call = _call(item, where)
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and reasoning is None:
                last.setdefault("tool_calls", []).append(call)
            else:
                message = {"role": "assistant", "content": "", "tool_calls": [call]}
                if reasoning is not None:
                    message["reasoning_content"], reasoning = reasoning, None
                out.append(message)
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise bad_request(
                    f"{where}.call_id: a function_call_output needs its call's call_id", f"{where}.call_id"
                )
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "content": _text(item.get("output"), f"{where}.output"),
                }
            )
        elif kind == "reasoning":
            reasoning = (reasoning or "") + _reasoning_text(item)
        else:
            raise bad_request(
                f"{where}.type {kind!r} is not supported (message, function_call, "
                "function_call_output and reasoning items only)",
                f"{where}.type",
            )
    return out


def _text(content: object, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of text parts", where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            out.append(part["text"])
        else:
            raise bad_request(
                f"{where}[{j}]: content parts of type {kind!r} are not supported by this server (text only)",
                f"{where}[{j}]",
            )
    return "".join(out)


def _reasoning_text(item: dict[str, Any]) -> str:
    parts = item.get("content") or item.get("summary") or []
    return "".join(p.get("text", "") for p in parts if isinstance(p, dict))


def _call(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments", "")
    if not isinstance(call_id, str) or not call_id:
        raise bad_request(f"{where}.call_id: a function_call needs a call_id", f"{where}.call_id")
    if not isinstance(name, str) or not name:
        raise bad_request(f"{where}.name: a function_call needs the function's name", f"{where}.name")
    if not isinstance(arguments, str):
        raise bad_request(f"{where}.arguments must be a JSON string", f"{where}.arguments")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise bad_request(
            f"tools[{i}].type {tool.get('type')!r} is not supported: function tools only", f"tools[{i}].type"
        )
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"tools[{i}].name: a function tool needs a name", f"tools[{i}].name")
    function: dict[str, Any] = {"name": name}  # keys in the order of a chat tool: the same prompt
    for key in ("description", "parameters", "strict"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice.get("type") in ("none", "auto", "required"):
        return str(choice["type"])
    raise bad_request(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "name": N}', "tool_choice"
    )


def _format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request("text.format must be an object", "text.format")
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise bad_request('text.format of type "json_schema" needs a schema object', "text.format.schema")
        spec = {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    return {"type": fmt.get("type")}


def not_found(response_id: str, param: str | None) -> APIError:
    return APIError(
        404,
        f"No response with id '{response_id}' found.",
        "invalid_request_error",
        param,
        "response_not_found",
    )
