"""Kimi-K2 chat prompt rendering: a native renderer of the K2 format, and a checkpoint's own
Jinja template rendered the way Hugging Face renders it.

The native renderer is byte-identical to Kimi-K2-Thinking's published template for the inputs
both accept (messages as OpenAI-style dicts, `tools` as OpenAI tool specs):

- an optional `tool_declare` system turn holding `json.dumps(tools, ensure_ascii=False)`;
- the default system turn unless the first message is a system message;
- each message as `<|im_{user|assistant|system}|>{name or role}<|im_middle|>...<|im_end|>`
  (any role other than user/assistant uses `<|im_system|>`);
- assistant turns open with `<think>{reasoning}</think>`, where the reasoning is kept only for
  messages after the last assistant message without tool calls (earlier ones get `<think></think>`),
  then the content, then the tool-call section;
- tool results as `## Return of {tool_call_id}\n{content}`;
- the generation prompt `<|im_assistant|>assistant<|im_middle|>` (it does not open `<think>`).

Values are printed as Jinja prints them: `str(value)` (so `None` reasoning prints `None`), and a
missing optional field prints nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from k2serve.chat.vocab import (
    IM_ASSISTANT,
    IM_END,
    IM_MIDDLE,
    IM_SYSTEM,
    IM_USER,
    THINK_BEGIN,
    THINK_END,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
)

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
GENERATION_PROMPT = f"{IM_ASSISTANT}assistant{IM_MIDDLE}"
MEDIA_PLACEHOLDER = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>\n"

Message = Mapping[str, Any]


class ChatTemplateError(ValueError):
    """A message list the K2 format cannot render; `value` is the offending message or field."""

    def __init__(self, message: str, value: object) -> None:
        super().__init__(f"{message}: {value!r}")
        self.value = value


def apply_chat_template(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
) -> str:
    """Render `messages` (and `tools`) as a K2 prompt string.

    Without `chat_template` the native K2 renderer is used; with it, that Jinja source is
    rendered in Hugging Face's sandboxed environment (see `render_jinja_template`).
    """
    if chat_template is not None:
        return render_jinja_template(
            chat_template, messages, tools=tools, add_generation_prompt=add_generation_prompt
        )
    for msg in messages:
        _check_message(msg)
    last_plain_assistant = -1
    for idx in range(len(messages) - 1, -1, -1):
        if messages[idx]["role"] == "assistant" and not messages[idx].get("tool_calls"):
            last_plain_assistant = idx
            break

    out: list[str] = []
    if tools:
        out.append(f"{IM_SYSTEM}tool_declare{IM_MIDDLE}{_tojson(tools)}{IM_END}")
    if not messages or messages[0]["role"] != "system":
        out.append(f"{IM_SYSTEM}system{IM_MIDDLE}{DEFAULT_SYSTEM_PROMPT}{IM_END}")
    for idx, msg in enumerate(messages):
        out.append(render_message(msg, keep_reasoning=idx > last_plain_assistant))
    if add_generation_prompt:
        out.append(GENERATION_PROMPT)
    return "".join(out)


def render_message(msg: Message, keep_reasoning: bool) -> str:
    """One message in the K2 format, `<|im_end|>` included; an assistant's reasoning only when
    `keep_reasoning` (the template drops it for turns before the last plain assistant turn)."""
    role = msg["role"]
    role_name = _jstr(msg.get("name") or role)
    opener = {"user": IM_USER, "assistant": IM_ASSISTANT}.get(role, IM_SYSTEM)
    parts = [f"{opener}{role_name}{IM_MIDDLE}"]
    if role == "assistant":
        reasoning = _jstr(msg.get("reasoning_content", "")) if keep_reasoning else ""
        parts.append(f"{THINK_BEGIN}{reasoning}{THINK_END}{_render_content(msg)}")
        if msg.get("tool_calls"):
            parts.append(_render_tool_calls(msg["tool_calls"]))
    elif role == "tool":
        parts.append(f"## Return of {_jstr(msg.get('tool_call_id', ''))}\n{_render_content(msg)}")
    else:
        parts.append(_render_content(msg))
    parts.append(IM_END)
    return "".join(parts)


def _render_content(msg: Message) -> str:
    content = msg.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        if part.get("type") == "image" or "image" in part or "image_url" in part:
            out.append(MEDIA_PLACEHOLDER)
        else:
            out.append(_jstr(part.get("text", "")))
    return "".join(out)


def _render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    out = [TOOL_CALLS_SECTION_BEGIN]
    for call in tool_calls:
        args = call["function"]["arguments"]
        args_text = args if isinstance(args, str) else _tojson(args)
        out.append(
            f"{TOOL_CALL_BEGIN}{_jstr(call.get('id', ''))}{TOOL_CALL_ARGUMENT_BEGIN}{args_text}{TOOL_CALL_END}"
        )
    out.append(TOOL_CALLS_SECTION_END)
    return "".join(out)


def _check_message(msg: object) -> None:
    """Reject what the official template cannot render (it would raise or print garbage)."""
    if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
        raise ChatTemplateError("a message must be a mapping with a string 'role'", msg)
    content = msg.get("content")
    if isinstance(content, Sequence) and not isinstance(content, str):
        for part in content:
            if not isinstance(part, Mapping):
                raise ChatTemplateError("a content part must be a mapping", part)
    elif content is not None and not isinstance(content, str):
        raise ChatTemplateError("content must be a string, a list of parts or None", content)
    if msg["role"] == "assistant" and msg.get("tool_calls"):
        for call in msg["tool_calls"]:
            fn = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(fn, Mapping) or "arguments" not in fn:
                raise ChatTemplateError("a tool call needs function.arguments", call)


def _jstr(value: object) -> str:
    """How Jinja prints a defined value: `str(value)`."""
    return value if isinstance(value, str) else str(value)


def _tojson(value: object) -> str:
    """Hugging Face's `tojson`: key order kept, non-ASCII kept, default separators."""
    return json.dumps(value, ensure_ascii=False)


# ----- a checkpoint's own Jinja template -----


def _hf_tojson(
    x: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _hf_tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_jinja_template(
    source: str,
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **context: Any,
) -> str:
    """Render a chat template as Hugging Face does: sandboxed and immutable, `trim_blocks`,
    `lstrip_blocks`, `{% break %}`/`{% continue %}`, `tojson` = `json.dumps(ensure_ascii=False)`
    without HTML escaping, and `raise_exception(msg)` / `strftime_now(fmt)` globals. Extra
    `context` (e.g. `bos_token`) is passed to the template. Template errors propagate as
    `jinja2.TemplateError`."""
    return _compile(source).render(
        messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **context
    )
