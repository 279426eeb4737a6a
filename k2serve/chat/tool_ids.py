"""Historical tool-call ids in K2's own form: `functions.{name}:{index}`.

K2 was trained on prompts whose tool-call ids are `functions.{name}:{index}`, the index a counter over
every tool call of the conversation from 0; clients send whatever ids they like (`call_abc123`,
`toolu_01...`, the ids K2 generated). `k2_tool_call_ids` rewrites a message list so the prompt is what
K2 was trained on: each assistant tool call gets the K2 id for its name and position, and each tool
result whose `tool_call_id` names an earlier call gets that call's K2 id (a client id reused across turns
maps to its latest call). A tool result naming no earlier call keeps its id. Nothing else changes, and
the input is not modified; the mapping is deterministic, so appending messages never changes how the
earlier ones render (prefix caching and sessions see the same prompt prefix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Message = Mapping[str, Any]


def k2_call_id(name: str, index: int) -> str:
    """The id K2 gives its `index`-th tool call of a conversation, a call to `name`."""
    return f"functions.{name}:{index}"


def k2_tool_call_ids(messages: Sequence[Message]) -> list[Message]:
    """`messages` with historical tool-call ids in K2's form (see the module docstring). Malformed
    messages are passed through unchanged for the renderer to refuse."""
    out: list[Message] = []
    index = 0
    to_k2: dict[str, str] = {}
    for original in messages:
        msg = original
        if not isinstance(msg, Mapping):
            out.append(msg)
            continue
        calls = msg.get("tool_calls")
        if msg.get("role") == "assistant" and isinstance(calls, Sequence) and calls:
            renamed = []
            for call in calls:
                fn = call.get("function") if isinstance(call, Mapping) else None
                name = fn.get("name") if isinstance(fn, Mapping) else None
                if not isinstance(name, str):
                    renamed.append(call)
                    continue
                k2_id = k2_call_id(name, index)
                index += 1
                client_id = call.get("id")
                if isinstance(client_id, str) and client_id:
                    to_k2[client_id] = k2_id
                renamed.append({**call, "id": k2_id})
            msg = {**msg, "tool_calls": renamed}
        elif msg.get("role") == "tool":
            ref = msg.get("tool_call_id")
            if isinstance(ref, str) and ref in to_k2:
                msg = {**msg, "tool_call_id": to_k2[ref]}
        out.append(msg)
    return out
