"""The chat request path every front door shares: messages, tools, tool_choice and response_format in;
the prompt ids, the grammar spec and how to read the output back out; typed errors naming the field.

The OpenAI-compatible HTTP API, the public gRPC API (`K2Serve.Chat`) and any later API that speaks in
chat messages parse their own wire format into OpenAI-shaped data (messages and tools as dicts), then:
`plan_chat(...)` checks the request and returns a ChatPlan; `plan.prompt(encoder, history)` renders
and encodes it (run it off the event loop: a long context takes a while); `plan.structured` goes into
`GenerateRequest.structured`; the output streams through `plan.output_text(...)` and `plan.parser()`;
`reply_message` and `finish_reason` shape what a finished turn returns and adds to a session.

The rules (`ChatRequestError` names the offending field for each):
- messages: at least one; roles system, developer, user, assistant, tool; developer is sent as system
  (the K2 format has no developer role);
- tool_choice: "none", "auto", "required" or {"type": "function", "function": {"name": N}}; unset is
  "auto" with tools and "none" without; "required" needs a tool; a named function must be in `tools`;
  tools enter the prompt unless tool_choice is "none";
- response_format: {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}; a
  json_schema format needs its json_schema object; a JSON format and a forced tool (required or
  named) exclude each other;
- a forced tool or a JSON format becomes the grammar spec (the backend compiles it); so does "auto"
  with tools (without a JSON format): free text, and once the model opens a tool-call section its calls
  must name a declared tool and their arguments match its schema (closed when the tool is `strict`);
- parallel_tool_calls false: at most one tool call per turn (a forced tool's grammar allows one call;
  under "auto" the parser keeps the first);
- a turn without tools in the prompt never returns tool calls or their text: a section the model
  opens anyway is dropped;
- historical tool-call ids are rendered as K2's `functions.{name}:{index}`, tool results' ids mapped
  to match (`k2serve.chat.tool_ids`), whatever ids the client sent;
- the prompt is rendered with the tokenizer's own chat template when it has one, else the native K2
  renderer, and message text never becomes special tokens (`PromptEncoder`); messages the template
  refuses are a ChatRequestError on "messages"; any other failure of the renderer propagates as it is
  (a server error, not the client's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from k2serve.chat.detok import REASONING_MARKERS, TOOL_MARKERS, OutputText
from k2serve.chat.parsers import OutputParser, ParsedOutput
from k2serve.chat.prompt import PromptEncoder
from k2serve.chat.template import ChatTemplateError
from k2serve.chat.tokenizer import KimiTokenizer
from k2serve.chat.tool_ids import k2_tool_call_ids

ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_CHOICE_MODES = ("none", "auto", "required")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
Message = dict[str, Any]


class ChatRequestError(ValueError):
    """The chat request is wrong: `param` names the field as the OpenAI API spells it (`tool_choice`,
    `response_format`, `messages`, `messages[2].role`) and `value` is the offending value."""

    def __init__(self, message: str, param: str, value: object = None) -> None:
        super().__init__(message)
        self.param = param
        self.value = value


@dataclass(frozen=True)
class ChatPlan:
    """A checked chat request.

    messages: the request's messages as they enter the prompt (and a session's history): roles
        mapped (developer -> system), nothing else changed.
    tools: the tools rendered into the prompt (None: none, or tool_choice "none").
    tool_names: the names of every declared tool (what the tool-call parser accepts).
    structured: the grammar spec for GenerateRequest.structured (None: unconstrained).
    parallel_tool_calls: False keeps a turn to one tool call (the grammar's when a tool is forced, the
        parser's otherwise: calls after the first are dropped).
    """

    messages: list[Message]
    tools: list[dict[str, Any]] | None
    tool_names: list[str]
    structured: dict[str, Any] | None
    parallel_tool_calls: bool = True

    @property
    def use_tools(self) -> bool:
        """Whether tool calls are expected in the output (tools are in the prompt)."""
        return self.tools is not None

    def prompt(self, encoder: PromptEncoder, history: Sequence[Message] = ()) -> list[int]:
        """The prompt ids of `history` (earlier messages, e.g. a session's, as stored) followed by this
        request's messages, with the generation prompt; ChatRequestError("messages") when the chat
        template cannot render them."""
        messages = k2_tool_call_ids([*history, *self.messages])
        try:
            return encoder.encode_chat(messages, self.tools, encoder.tokenizer.chat_template)
        except (ChatTemplateError, jinja2.TemplateError) as e:
            raise ChatRequestError(f"the messages cannot be rendered: {e}", "messages") from e

    def parser(self) -> OutputParser:
        """A fresh parser for the output text: reasoning, content, and tool calls when tools are in play.
        Without tools in the prompt a tool-call section the model opens anyway is dropped (never content);
        with `parallel_tool_calls` false only the first call is kept."""
        if not self.use_tools:
            return OutputParser(tool_names=(), max_calls=0)
        return OutputParser(tool_names=self.tool_names, max_calls=None if self.parallel_tool_calls else 1)

    def output_text(
        self,
        tokenizer: KimiTokenizer,
        *,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> OutputText:
        """The output text of one request with these sampling settings: the markers the parser needs
        are kept (the tool-call markers also without tools, so that the parser can drop a section), the token that ended generation and anything from a stop string on are not."""
        return OutputText(
            tokenizer,
            skip_special_tokens=skip_special_tokens,
            keep=REASONING_MARKERS + TOOL_MARKERS,
            final_stop_ids=tokenizer.stop_ids | set(stop_token_ids),
            stop=stop,
        )


def plan_chat(
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
    response_format: dict[str, Any] | None = None,
    parallel_tool_calls: bool = True,
) -> ChatPlan:
    """Check a chat request (see the module docstring for the rules); raises ChatRequestError."""
    checked = _messages(messages)
    names = [t["function"]["name"] for t in tools or []]
    choice = _tool_choice(tool_choice, names)
    forced = choice == "required" or isinstance(choice, dict)
    json_format = _json_format(response_format)
    if forced and json_format is not None:
        raise ChatRequestError(
            "response_format cannot be combined with a forced tool_choice", "response_format", response_format
        )
    structured: dict[str, Any] | None = None
    if forced or (choice == "auto" and json_format is None):
        structured = {"tools": list(tools or []), "tool_choice": choice}
        if choice == "auto":  # free text and reasoning; the grammar binds at the tool-call section
            structured["allow_reasoning"] = True
        if not parallel_tool_calls:
            structured["parallel_tool_calls"] = False
    elif json_format is not None:
        structured = {"response_format": json_format}
    prompt_tools = list(tools) if tools and choice != "none" else None
    return ChatPlan(checked, prompt_tools, names, structured, parallel_tool_calls)


def _messages(messages: Sequence[Message]) -> list[Message]:
    if not messages:
        raise ChatRequestError("messages is empty: at least one message is required", "messages", [])
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise ChatRequestError(
                f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}", f"messages[{i}].role", role
            )
        out.append({**m, "role": "system"} if role == "developer" else dict(m))
    return out


def _tool_choice(choice: str | dict[str, Any] | None, names: list[str]) -> str | dict[str, Any]:
    """The effective tool_choice, checked against the declared tools."""
    if choice is None:
        return "auto" if names else "none"
    if isinstance(choice, str):
        if choice not in TOOL_CHOICE_MODES:
            raise ChatRequestError(
                f"tool_choice {choice!r} is not one of {', '.join(TOOL_CHOICE_MODES)} or a named function",
                "tool_choice",
                choice,
            )
        if choice == "required" and not names:
            raise ChatRequestError(
                'tool_choice "required" needs at least one tool in tools', "tool_choice", choice
            )
        return choice
    name = choice.get("function", {}).get("name") if choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise ChatRequestError(
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": N}}',
            "tool_choice",
            choice,
        )
    if name not in names:
        raise ChatRequestError(f"tool_choice names {name!r}, which is not in tools", "tool_choice", choice)
    return choice


def _json_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """`fmt` when it asks for JSON output, None for text (or no format)."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind not in RESPONSE_FORMATS:
        raise ChatRequestError(
            f"response_format type {kind!r} is not one of {', '.join(RESPONSE_FORMATS)}",
            "response_format",
            fmt,
        )
    if kind == "json_schema" and fmt.get("json_schema") is None:
        raise ChatRequestError(
            'response_format of type "json_schema" needs a json_schema object', "response_format", fmt
        )
    return None if kind == "text" else fmt


def reply_message(out: ParsedOutput) -> dict[str, Any]:
    """The assistant message (OpenAI shape) of a parsed output: what a response carries and a session
    records."""
    calls = [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in out.tool_calls
    ]
    message: dict[str, Any] = {
        "role": "assistant",
        "content": out.content if out.content or not calls else None,
        "reasoning_content": out.reasoning or None,
    }
    if calls:
        message["tool_calls"] = calls
    return message


def finish_reason(reason: str | None, made_calls: bool) -> str | None:
    """The finish reason a client sees: "tool_calls" when generation stopped after tool calls."""
    return "tool_calls" if made_calls and reason == "stop" else reason
