"""K2 output in Anthropic's shapes: content blocks, stop reasons, usage, and the streamed events.

A parsed output becomes, in order, a `thinking` block (K2's reasoning), `text` blocks and `tool_use`
blocks ({id, name, input}); a stream opens a block when the kind of output changes and closes it when
the next one opens (`content_block_start` / `content_block_delta` with `thinking_delta`, `text_delta`
or `input_json_delta` / `content_block_stop`), framed by `message_start`, a `ping`, and
`message_delta` (stop_reason, stop_sequence, usage) + `message_stop`. A thinking block carries its
`signature` (`sign(thinking)`, see k2serve.api.thinking): in the block itself when not streamed; streamed,
the block starts with an empty one and a `signature_delta` with the whole signature comes just before its
`content_block_stop`, as Anthropic sends it.

Usage follows Anthropic's accounting: `input_tokens` are the prompt tokens computed for this request,
`cache_read_input_tokens` the ones served by the prefix cache; their sum is the prompt length, which
is what /v1/messages/count_tokens returns for the same request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from k2serve.chat.parsers import DeltaEvent, EventKind, ParsedOutput, ToolCall


def usage(prompt_tokens: int, cached_tokens: int, output_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": prompt_tokens - cached_tokens,
        "output_tokens": output_tokens,
        "cache_read_input_tokens": cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def stop_reason(finish: str | None, made_calls: bool, stop_sequence: str | None) -> str:
    """Anthropic's stop_reason for an engine finish reason ("stop", "length")."""
    if finish == "length":
        return "max_tokens"
    if stop_sequence is not None:
        return "stop_sequence"
    return "tool_use" if made_calls else "end_turn"


def tool_input(call: ToolCall) -> dict[str, Any]:
    """The call's arguments as an object; arguments that are not a JSON object give {}."""
    try:
        value = json.loads(call.arguments)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


Sign = Callable[[str], str]  # thinking text -> its signature


def content_blocks(out: ParsedOutput, sign: Sign) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if out.reasoning:
        blocks.append({"type": "thinking", "thinking": out.reasoning, "signature": sign(out.reasoning)})
    if out.content:
        blocks.append({"type": "text", "text": out.content})
    for call in out.tool_calls:
        blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": tool_input(call)})
    return blocks


def event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


class BlockStream:
    """Parser events -> Anthropic content-block events, one block open at a time."""

    _DELTAS = {
        EventKind.REASONING: ("thinking", "thinking_delta", "thinking"),
        EventKind.CONTENT: ("text", "text_delta", "text"),
    }

    def __init__(self, sign: Sign) -> None:
        self._sign = sign
        self._index = -1
        self._open: str | None = None  # "thinking", "text" or "tool_use"
        self._thinking: list[str] = []  # the open thinking block's text so far
        self.made_calls = False

    def feed(self, events: list[DeltaEvent]) -> Iterator[str]:
        for ev in events:
            if ev.kind in self._DELTAS:
                block, delta_type, field = self._DELTAS[ev.kind]
                if self._open != block:
                    yield from self._start({"type": block, field: ""} | self._signature(block))
                if block == "thinking":
                    self._thinking.append(ev.text)
                delta = {"type": delta_type, field: ev.text}
                yield event("content_block_delta", {"index": self._index, "delta": delta})
            elif ev.kind is EventKind.TOOL_CALL_BEGIN and ev.tool_call is not None:
                self.made_calls = True
                call = ev.tool_call
                yield from self._start({"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
            elif ev.kind is EventKind.TOOL_CALL_ARGUMENTS and self._open == "tool_use":
                delta = {"type": "input_json_delta", "partial_json": ev.text}
                yield event("content_block_delta", {"index": self._index, "delta": delta})
            elif ev.kind is EventKind.TOOL_CALL_END:
                yield from self.close()

    def close(self) -> Iterator[str]:
        """Close the open block, if any (a thinking block's signature first)."""
        if self._open == "thinking":
            delta = {"type": "signature_delta", "signature": self._sign("".join(self._thinking))}
            yield event("content_block_delta", {"index": self._index, "delta": delta})
            self._thinking = []
        if self._open is not None:
            yield event("content_block_stop", {"index": self._index})
            self._open = None

    def _start(self, block: dict[str, Any]) -> Iterator[str]:
        yield from self.close()
        self._index += 1
        self._open = block["type"]
        yield event("content_block_start", {"index": self._index, "content_block": block})

    @staticmethod
    def _signature(block: str) -> dict[str, str]:
        return {"signature": ""} if block == "thinking" else {}
