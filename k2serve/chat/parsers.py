"""Incremental parsers of K2 model output: reasoning (`<think>...</think>`) and Kimi tool calls.

Output grammar (special tokens arrive as their text):
`[<think> reasoning </think>] content [<|tool_calls_section_begin|> (<|tool_call_begin|> ID
<|tool_call_argument_begin|> JSON <|tool_call_end|>)+ <|tool_calls_section_end|>] content`.

Every parser works on text deltas: `feed(delta)` returns the events that became certain, and
`finish()` the rest. A marker split across deltas is held back until it is complete. The result
never depends on how the text was split: `collect(feed(a) + feed(b) + finish())` equals
`parse(a + b)`. Parsers never raise on any input: a missing `<|tool_calls_section_end|>` or
`<|tool_call_end|>` still yields the call (`complete=False`), malformed JSON is kept as the raw
argument string (`valid_arguments=False`), and an undeclared function is flagged (`known=False`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import Enum

from k2serve.chat.vocab import (
    THINK_BEGIN,
    THINK_END,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
)


@dataclass(frozen=True)
class ToolCall:
    """One parsed call. `id` is the whole generated id (`functions.get_weather:0`), which is
    the OpenAI `tool_call.id`; `name` is the part between its last '.' and its ':'; `index` is
    the call's position in this output; `arguments` is the raw generated argument text."""

    id: str
    name: str
    arguments: str
    index: int
    valid_arguments: bool  # `arguments` parses as a JSON object
    known: bool  # `name` is a declared tool (always True when no tool list was given)
    complete: bool  # `<|tool_call_end|>` was seen


class EventKind(Enum):
    REASONING = "reasoning"
    CONTENT = "content"
    TOOL_CALL_BEGIN = "tool_call_begin"  # id and name are known
    TOOL_CALL_ARGUMENTS = "tool_call_arguments"  # `text` is a piece of the argument string
    TOOL_CALL_END = "tool_call_end"  # `tool_call` is final


@dataclass(frozen=True)
class DeltaEvent:
    """A streamed piece of output. `text` holds reasoning/content/argument text; tool events
    carry `tool_index`, and `tool_call` (BEGIN: arguments still empty; END: the final call)."""

    kind: EventKind
    text: str = ""
    tool_index: int = -1
    tool_call: ToolCall | None = None


@dataclass(frozen=True)
class ParsedOutput:
    reasoning: str
    content: str
    tool_calls: tuple[ToolCall, ...]


def collect(events: Iterable[DeltaEvent]) -> ParsedOutput:
    """Fold streamed events into the one-shot result."""
    reasoning, content, calls = [], [], []
    for ev in events:
        if ev.kind is EventKind.REASONING:
            reasoning.append(ev.text)
        elif ev.kind is EventKind.CONTENT:
            content.append(ev.text)
        elif ev.kind is EventKind.TOOL_CALL_END and ev.tool_call is not None:
            calls.append(ev.tool_call)
    return ParsedOutput("".join(reasoning), "".join(content), tuple(calls))


def _next_marker(buf: str, markers: tuple[str, ...]) -> tuple[str, str | None, str]:
    """Split `buf` at its first complete marker: (text before, marker, text after).

    Without a complete marker, returns (safe text, None, held tail) where the held tail is the
    longest suffix of `buf` that could still grow into a marker.
    """
    best_pos, best = -1, None
    for m in markers:
        pos = buf.find(m)
        if pos >= 0 and (best is None or pos < best_pos or (pos == best_pos and len(m) > len(best))):
            best_pos, best = pos, m
    if best is not None:
        return buf[:best_pos], best, buf[best_pos + len(best) :]
    for keep in range(min(len(buf), max(len(m) for m in markers) - 1), 0, -1):
        tail = buf[-keep:]
        if any(m.startswith(tail) for m in markers):
            return buf[:-keep], None, tail
    return buf, None, ""


class ReasoningParser:
    """Splits output into reasoning and content.

    Reasoning is open when the output starts with `<think>`, or from the first character when
    `starts_in_reasoning` (a prompt that already opened the think block; K2-Thinking's does
    not). It closes at `</think>` (dropped) or at `<|tool_calls_section_begin|>` (kept, as
    content). Output that ends inside reasoning is all reasoning. Everything after is content.
    """

    _START, _REASONING, _CONTENT = range(3)
    _MARKERS = (THINK_END, TOOL_CALLS_SECTION_BEGIN)

    def __init__(self, starts_in_reasoning: bool = False) -> None:
        self._starts_in_reasoning = starts_in_reasoning
        self._state = self._START
        self._buf = ""

    def feed(self, delta: str) -> list[DeltaEvent]:
        self._buf += delta
        events: list[DeltaEvent] = []
        if self._state == self._START:
            if self._buf.startswith(THINK_BEGIN):
                self._buf = self._buf[len(THINK_BEGIN) :]
                self._state = self._REASONING
            elif THINK_BEGIN.startswith(self._buf):
                return events  # still a possible `<think>`
            else:
                self._state = self._REASONING if self._starts_in_reasoning else self._CONTENT
        if self._state == self._REASONING:
            before, marker, self._buf = _next_marker(self._buf, self._MARKERS)
            _emit(events, EventKind.REASONING, before)
            if marker is None:
                return events
            self._state = self._CONTENT
            if marker == TOOL_CALLS_SECTION_BEGIN:
                self._buf = marker + self._buf
        _emit(events, EventKind.CONTENT, self._buf)
        self._buf = ""
        return events

    def finish(self) -> list[DeltaEvent]:
        in_reasoning = self._state == self._REASONING or (
            self._state == self._START and self._starts_in_reasoning
        )
        events: list[DeltaEvent] = []
        _emit(events, EventKind.REASONING if in_reasoning else EventKind.CONTENT, self._buf)
        self._buf = ""
        self._state = self._CONTENT
        return events

    def parse(self, text: str) -> ParsedOutput:
        """One-shot parse with a fresh parser of the same configuration."""
        p = ReasoningParser(self._starts_in_reasoning)
        return collect(p.feed(text) + p.finish())


def _emit(events: list[DeltaEvent], kind: EventKind, text: str, index: int = -1) -> None:
    if text:
        events.append(DeltaEvent(kind, text, index))


class ToolCallParser:
    """Splits content into plain content and Kimi tool calls.

    `<|tool_call_begin|>` opens a call inside a tool-call section (or, leniently, outside one);
    the id runs to `<|tool_call_argument_begin|>`, the arguments to `<|tool_call_end|>`. A new
    `<|tool_call_begin|>` or `<|tool_calls_section_end|>` closes an unfinished call. Section
    markers are dropped; any other text, including stray text inside a section, is content.
    `tool_names`, when given, marks calls to other functions `known=False`. `max_calls`, when given,
    keeps only the first `max_calls` calls: the events of later ones are dropped (0 drops every call,
    for a turn without tools; 1 for `parallel_tool_calls: false`), their text never becomes content.
    """

    _TEXT, _SECTION, _CALL_ID, _CALL_ARGS = range(4)
    _MARKERS = {
        _TEXT: (TOOL_CALLS_SECTION_BEGIN, TOOL_CALL_BEGIN),
        _SECTION: (TOOL_CALL_BEGIN, TOOL_CALLS_SECTION_END),
        _CALL_ID: (TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_END, TOOL_CALL_BEGIN, TOOL_CALLS_SECTION_END),
        _CALL_ARGS: (TOOL_CALL_END, TOOL_CALL_BEGIN, TOOL_CALLS_SECTION_END),
    }

    def __init__(self, tool_names: Collection[str] | None = None, max_calls: int | None = None) -> None:
        self._tool_names = None if tool_names is None else frozenset(tool_names)
        self._max_calls = max_calls
        self._state = self._TEXT
        self._buf = ""
        self._id = ""  # id text of the open call
        self._args: list[str] = []  # argument pieces of the open call
        self._index = -1  # index of the open (or last) call

    def feed(self, delta: str) -> list[DeltaEvent]:
        self._buf += delta
        events: list[DeltaEvent] = []
        while True:
            before, marker, self._buf = _next_marker(self._buf, self._MARKERS[self._state])
            self._text(events, before)
            if marker is None:
                return self._kept(events)
            self._marker(events, marker)

    def finish(self) -> list[DeltaEvent]:
        events: list[DeltaEvent] = []
        self._text(events, self._buf)
        self._buf = ""
        if self._state == self._CALL_ID:
            self._begin_call(events)
        if self._state == self._CALL_ARGS:
            self._end_call(events, complete=False)
        self._state = self._TEXT
        return self._kept(events)

    def parse(self, text: str) -> ParsedOutput:
        """One-shot parse with a fresh parser of the same configuration."""
        p = ToolCallParser(self._tool_names, self._max_calls)
        return collect(p.feed(text) + p.finish())

    def _kept(self, events: list[DeltaEvent]) -> list[DeltaEvent]:
        """`events` less those of calls past `max_calls`."""
        if self._max_calls is None:
            return events
        return [ev for ev in events if ev.kind is EventKind.CONTENT or ev.tool_index < self._max_calls]

    def _text(self, events: list[DeltaEvent], text: str) -> None:
        if self._state == self._CALL_ID:
            self._id += text
        elif self._state == self._CALL_ARGS:
            self._args.append(text)
            _emit(events, EventKind.TOOL_CALL_ARGUMENTS, text, self._index)
        else:
            _emit(events, EventKind.CONTENT, text)

    def _marker(self, events: list[DeltaEvent], marker: str) -> None:
        if self._state == self._CALL_ID:
            self._begin_call(events)
            if marker == TOOL_CALL_ARGUMENT_BEGIN:
                return
        if self._state == self._CALL_ARGS:
            self._end_call(events, complete=marker == TOOL_CALL_END)
        if marker == TOOL_CALL_BEGIN:
            self._state, self._id = self._CALL_ID, ""
        elif marker == TOOL_CALLS_SECTION_BEGIN:
            self._state = self._SECTION
        elif marker == TOOL_CALLS_SECTION_END:
            self._state = self._TEXT
        else:  # TOOL_CALL_END
            self._state = self._SECTION

    def _begin_call(self, events: list[DeltaEvent]) -> None:
        self._index += 1
        self._args = []
        call = self._make_call(complete=False)
        events.append(DeltaEvent(EventKind.TOOL_CALL_BEGIN, "", self._index, call))
        self._state = self._CALL_ARGS

    def _end_call(self, events: list[DeltaEvent], complete: bool) -> None:
        call = self._make_call(complete)
        events.append(DeltaEvent(EventKind.TOOL_CALL_END, "", call.index, call))
        self._state = self._SECTION

    def _make_call(self, complete: bool) -> ToolCall:
        call_id = self._id.strip()
        head = call_id.rsplit(":", 1)[0] if ":" in call_id else call_id
        name = head.rsplit(".", 1)[-1]
        arguments = "".join(self._args)
        return ToolCall(
            id=call_id,
            name=name,
            arguments=arguments,
            index=self._index,
            valid_arguments=_is_json_object(arguments),
            known=self._tool_names is None or name in self._tool_names,
            complete=complete,
        )


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


class OutputParser:
    """Reasoning parser followed by the tool-call parser on its content: the full K2 output."""

    def __init__(
        self,
        starts_in_reasoning: bool = False,
        tool_names: Collection[str] | None = None,
        max_calls: int | None = None,
    ) -> None:
        self._config = (starts_in_reasoning, None if tool_names is None else frozenset(tool_names), max_calls)
        self._reasoning = ReasoningParser(starts_in_reasoning)
        self._tools = ToolCallParser(tool_names, max_calls)

    def feed(self, delta: str) -> list[DeltaEvent]:
        return self._route(self._reasoning.feed(delta))

    def finish(self) -> list[DeltaEvent]:
        return self._route(self._reasoning.finish()) + self._tools.finish()

    def parse(self, text: str) -> ParsedOutput:
        """One-shot parse with a fresh parser of the same configuration."""
        p = OutputParser(*self._config)
        return collect(p.feed(text) + p.finish())

    def _route(self, events: list[DeltaEvent]) -> list[DeltaEvent]:
        out: list[DeltaEvent] = []
        for ev in events:
            out.extend(self._tools.feed(ev.text) if ev.kind is EventKind.CONTENT else [ev])
        return out
