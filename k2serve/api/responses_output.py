"""K2 output as Responses-API output items and stream events.

Reasoning becomes a `reasoning` item (its text as `reasoning_text` content), content a `message` item
with one `output_text` part, each tool call a `function_call` item (`call_id` is K2's call id). One
item is open at a time; a stream says, per item: `response.output_item.added`, its deltas
(`response.reasoning_text.delta`, `response.content_part.added` + `response.output_text.delta`,
`response.function_call_arguments.delta`), their `.done` events, and `response.output_item.done`.
Every event carries a `sequence_number`. The same code builds a non-streamed response's output.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from k2serve.chat.parsers import DeltaEvent, EventKind


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(prompt_tokens: int, cached_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output_tokens,
    }


class OutputItems:
    """Parser events -> output items (`items`, in order) and the stream events that build them."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.sequence = 0
        self._open: dict[str, Any] | None = None
        self._text = ""  # the open item's text (reasoning, output text or arguments)

    def event(self, kind: str, **data: Any) -> str:
        body = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    @property
    def made_calls(self) -> bool:
        return any(item["type"] == "function_call" for item in self.items)

    def feed(self, events: list[DeltaEvent]) -> Iterator[str]:
        for ev in events:
            if ev.kind is EventKind.REASONING:
                if self._kind != "reasoning":
                    yield from self._add({"id": _id("rs"), "type": "reasoning", "summary": [], "content": []})
                yield from self._delta("response.reasoning_text.delta", ev.text, content_index=0)
            elif ev.kind is EventKind.CONTENT:
                if self._kind != "message":
                    item = {"id": _id("msg"), "type": "message", "role": "assistant", "status": "in_progress"}
                    yield from self._add(item | {"content": []})
                    part = {"type": "output_text", "text": "", "annotations": []}
                    yield self._item_event("response.content_part.added", content_index=0, part=part)
                yield from self._delta("response.output_text.delta", ev.text, content_index=0, logprobs=[])
            elif ev.kind is EventKind.TOOL_CALL_BEGIN and ev.tool_call is not None:
                call = ev.tool_call
                item = {"id": _id("fc"), "type": "function_call", "call_id": call.id, "name": call.name}
                yield from self._add(item | {"arguments": "", "status": "in_progress"})
            elif ev.kind is EventKind.TOOL_CALL_ARGUMENTS and self._kind == "function_call":
                yield from self._delta("response.function_call_arguments.delta", ev.text)
            elif ev.kind is EventKind.TOOL_CALL_END:
                yield from self.close()

    def close(self) -> Iterator[str]:
        """Finish the open item, if any."""
        item, text = self._open, self._text
        if item is None:
            return
        if item["type"] == "reasoning":
            item["content"] = [{"type": "reasoning_text", "text": text}]
            yield self._item_event("response.reasoning_text.done", content_index=0, text=text)
        elif item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            item["content"], item["status"] = [part], "completed"
            yield self._item_event("response.output_text.done", content_index=0, text=text, logprobs=[])
            yield self._item_event("response.content_part.done", content_index=0, part=part)
        else:
            item["arguments"], item["status"] = text, "completed"
            yield self._item_event("response.function_call_arguments.done", arguments=text, name=item["name"])
        yield self.event("response.output_item.done", output_index=len(self.items) - 1, item=item)
        self._open, self._text = None, ""

    @property
    def _kind(self) -> str | None:
        return None if self._open is None else str(self._open["type"])

    def _add(self, item: dict[str, Any]) -> Iterator[str]:
        yield from self.close()
        self.items.append(item)
        self._open = item
        yield self.event("response.output_item.added", output_index=len(self.items) - 1, item=item)

    def _delta(self, kind: str, text: str, **extra: Any) -> Iterator[str]:
        self._text += text
        yield self._item_event(kind, delta=text, **extra)

    def _item_event(self, kind: str, **data: Any) -> str:
        assert self._open is not None
        return self.event(kind, item_id=self._open["id"], output_index=len(self.items) - 1, **data)
