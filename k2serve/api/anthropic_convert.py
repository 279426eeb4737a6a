"""An Anthropic Messages request -> the one chat request (`k2serve.chat.request.plan_chat`'s inputs).

What maps to what:
- `system` (a string or text blocks) -> a leading system message;
- a user message's `text` blocks -> a user message; each `tool_result` block -> a tool message
  (`tool_call_id` = `tool_use_id`; its content a string or text blocks; `is_error` prefixes "Error: ");
  their order is kept;
- an assistant message's `thinking` blocks -> `reasoning_content` (K2's reasoning round-trips) once
  their `signature`, when not empty, verifies (k2serve.api.thinking; else a 400 naming the block),
  `redacted_thinking` is dropped, `text` -> content, `tool_use` -> `tool_calls` (arguments: the
  input as JSON);
- `tools` ({name, description, input_schema}) -> function tools; server tools (any other `type`) are
  refused;
- `tool_choice` auto / any / tool / none -> "auto" / "required" / the named function / "none";
- `stop_sequences`, `max_tokens`, `temperature`, `top_p`, `top_k` -> sampling; `metadata`, `thinking`,
  `service_tier` and cache_control marks are accepted and have no effect.
Content other than text (images, documents) is refused with a 400 naming the block, and so is a
block in the wrong role (a `tool_use` from the user), as an `AnthropicError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from k2serve.api.anthropic_errors import from_validation, invalid
from k2serve.api.schemas import SamplingFields

Message = dict[str, Any]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicTool(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]
    type: str | None = None


class AnthropicToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class CountTokensRequest(_Body):
    """The body of /v1/messages/count_tokens: what enters the prompt."""

    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: dict[str, Any] | None = None


class MessagesRequest(CountTokensRequest):
    """The body of /v1/messages."""

    max_tokens: int = Field(ge=1)
    stream: bool = False
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: dict[str, Any] | None = None


def parse(body: object, kind: type[CountTokensRequest]) -> Any:
    """`body` (decoded JSON) as `kind`; an AnthropicError naming the first wrong field otherwise."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        raise from_validation(e) from e


@dataclass(frozen=True)
class ChatInputs:
    """What `plan_chat` takes, in OpenAI's shapes."""

    messages: list[Message]
    tools: list[dict[str, Any]] | None
    tool_choice: str | dict[str, Any] | None
    parallel_tool_calls: bool = True  # False: tool_choice.disable_parallel_tool_use


Verify = Callable[[str, str], bool]  # (thinking, signature) -> whether this server signed it


def chat_inputs(req: CountTokensRequest, verify: Verify) -> ChatInputs:
    messages: list[Message] = []
    if req.system is not None:
        system = req.system if isinstance(req.system, str) else _text_of(req.system, "system", "system")
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        where = f"messages.{i}.content"
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
        elif m.role == "user":
            messages += _user(m.content, where)
        else:
            messages.append(_assistant(m.content, where, verify))
    tools = [_tool(t, f"tools.{i}") for i, t in enumerate(req.tools)] if req.tools else None
    parallel = req.tool_choice is None or not req.tool_choice.disable_parallel_tool_use
    return ChatInputs(messages, tools, _tool_choice(req.tool_choice), parallel)


def sampling_fields(req: MessagesRequest, model: str) -> SamplingFields:
    """The request's sampling fields in the shape the shared SamplingParams builder reads."""
    return SamplingFields(
        model=model,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        stop=req.stop_sequences,
    )


def _block_type(block: dict[str, Any], where: str) -> str:
    kind = block.get("type")
    if not isinstance(kind, str):
        raise invalid(f"{where}.type: every content block needs a string type")
    if kind in ("image", "document", "search_result", "container_upload"):
        raise invalid(f"{where}: {kind} content blocks are not supported by this server (text only)")
    return kind


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise invalid(f"{where}.text: a text block needs a string text")
    return text


def _text_of(blocks: list[dict[str, Any]], where: str, owner: str) -> str:
    """The text of a list of text blocks (a system prompt, a tool result's content)."""
    out = []
    for j, block in enumerate(blocks):
        kind = _block_type(block, f"{where}.{j}")
        if kind != "text":
            raise invalid(f"{where}.{j}: {owner} content must be text blocks, not {kind}")
        out.append(_text(block, f"{where}.{j}"))
    return "".join(out)


def _user(blocks: list[dict[str, Any]], where: str) -> list[Message]:
    out: list[Message] = []
    for j, block in enumerate(blocks):
        at = f"{where}.{j}"
        kind = _block_type(block, at)
        if kind == "text":
            text = _text(block, at)
            if out and out[-1]["role"] == "user":
                out[-1]["content"] += text
            else:
                out.append({"role": "user", "content": text})
        elif kind == "tool_result":
            out.append(_tool_result(block, at))
        else:
            raise invalid(f"{at}: a user message cannot hold a {kind} block (text and tool_result only)")
    return out


def _tool_result(block: dict[str, Any], where: str) -> Message:
    tool_use_id = block.get("tool_use_id")
    if not isinstance(tool_use_id, str) or not tool_use_id:
        raise invalid(f"{where}.tool_use_id: a tool_result needs the id of its tool_use")
    content = block.get("content", "")
    if isinstance(content, list):
        content = _text_of(content, f"{where}.content", "tool_result")
    elif not isinstance(content, str):
        raise invalid(f"{where}.content: must be a string or a list of text blocks")
    if block.get("is_error"):
        content = f"Error: {content}"
    return {"role": "tool", "tool_call_id": tool_use_id, "content": content}


def _assistant(blocks: list[dict[str, Any]], where: str, verify: Verify) -> Message:
    reasoning: list[str] = []
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at = f"{where}.{j}"
        kind = _block_type(block, at)
        if kind == "thinking":
            thinking = block.get("thinking")
            if not isinstance(thinking, str):
                raise invalid(f"{at}.thinking: a thinking block needs a string thinking")
            signature = block.get("signature") or ""
            if not isinstance(signature, str):
                raise invalid(f"{at}.signature: must be a string")
            if signature and not verify(thinking, signature):
                raise invalid(
                    f"{at}.signature: invalid signature in thinking block {at}: the thinking was changed, "
                    "or was signed by another server (send the block back as the server returned it)"
                )
            reasoning.append(thinking)
        elif kind == "redacted_thinking":
            continue
        elif kind == "text":
            text.append(_text(block, at))
        elif kind == "tool_use":
            calls.append(_tool_use(block, at))
        else:
            raise invalid(
                f"{at}: an assistant message cannot hold a {kind} block (text, thinking and tool_use only)"
            )
    message: Message = {"role": "assistant", "content": "".join(text)}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_use(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, name, args = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not call_id:
        raise invalid(f"{where}.id: a tool_use block needs a string id")
    if not isinstance(name, str) or not name:
        raise invalid(f"{where}.name: a tool_use block needs the tool's name")
    if not isinstance(args, dict):
        raise invalid(f"{where}.input: must be an object")
    arguments = json.dumps(args, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _tool(tool: AnthropicTool, where: str) -> dict[str, Any]:
    if tool.type not in (None, "custom"):
        raise invalid(f"{where}.type: server tools ({tool.type}) are not supported; declare a custom tool")
    function: dict[str, Any] = {"name": tool.name}  # keys in the order of an OpenAI tool: same prompt
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = tool.input_schema
    return {"type": "function", "function": function}


def _tool_choice(choice: AnthropicToolChoice | None) -> str | dict[str, Any] | None:
    if choice is None:
        return None
    if choice.type == "tool":
        if not choice.name:
            raise invalid('tool_choice.name: tool_choice of type "tool" needs the tool\'s name')
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]
