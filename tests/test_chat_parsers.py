"""Reasoning and tool-call output parsers: one-shot results, split invariance, robustness."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from k2serve.chat.parsers import (
    DeltaEvent,
    EventKind,
    OutputParser,
    ParsedOutput,
    ReasoningParser,
    ToolCall,
    ToolCallParser,
    collect,
)

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
MARKERS = [SB, SE, CB, AB, CE, "<think>", "</think>"]


def stream(parser: Any, text: str, cuts: list[int]) -> list[DeltaEvent]:
    """Feed `text` cut at the (sorted, clipped) positions `cuts`, then finish."""
    bounds = [0, *sorted(min(c, len(text)) for c in cuts), len(text)]
    events: list[DeltaEvent] = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        events += parser.feed(text[lo:hi])
    return events + parser.finish()


def check_event_order(events: list[DeltaEvent]) -> None:
    """Per call: BEGIN, then ARGUMENTS pieces, then END whose arguments are those pieces."""
    pieces: dict[int, list[str]] = {}
    ended: list[int] = []
    for ev in events:
        if ev.kind is EventKind.TOOL_CALL_BEGIN:
            assert ev.tool_index == len(pieces) and ev.tool_call is not None
            pieces[ev.tool_index] = []
        elif ev.kind is EventKind.TOOL_CALL_ARGUMENTS:
            assert ev.tool_index in pieces and ev.tool_index not in ended
            pieces[ev.tool_index].append(ev.text)
        elif ev.kind is EventKind.TOOL_CALL_END:
            assert ev.tool_call is not None and ev.tool_index not in ended
            assert ev.tool_call.arguments == "".join(pieces[ev.tool_index])
            ended.append(ev.tool_index)
        else:
            assert ev.text
    assert ended == sorted(pieces)


# ----- valid outputs -----

# Plain text that contains no complete marker (but may contain marker fragments).
plain = (
    st.lists(
        st.one_of(
            st.text(max_size=8), st.sampled_from(["<", "<|", "<|tool_call", "<think", "</", "|>", "\n"])
        ),
        max_size=5,
    )
    .map("".join)
    .filter(lambda s: not any(m in s for m in MARKERS))
)
json_args = st.dictionaries(
    st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=8), st.lists(st.booleans())), max_size=3
)
names = st.sampled_from(["get_weather", "search", "do.it", "unknown_fn"])


@st.composite
def valid_output(draw: st.DrawFn) -> tuple[str, ParsedOutput]:
    reasoning = draw(st.none() | plain)
    content = draw(plain)
    calls: list[ToolCall] = []
    text = "" if reasoning is None else f"<think>{reasoning}</think>"
    text += content
    n_calls = draw(st.integers(0, 3))
    if n_calls:
        text += SB
        for idx in range(n_calls):
            name = draw(names)
            args = json.dumps(draw(json_args), ensure_ascii=draw(st.booleans()))
            call_id = f"functions.{name}:{idx}"
            text += f"{CB}{call_id}{AB}{args}{CE}"
            calls.append(
                ToolCall(call_id, name.rsplit(".", 1)[-1], args, idx, True, name != "unknown_fn", True)
            )
        text += SE if draw(st.booleans()) else ""
    expected = ParsedOutput(reasoning or "", content, tuple(calls))
    return text, expected


@settings(max_examples=300, deadline=None)
@given(case=valid_output(), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_valid_output_parses_the_same_whole_and_split(
    case: tuple[str, ParsedOutput], cuts: list[int]
) -> None:
    text, expected = case
    tools = ["get_weather", "search", "it"]
    assert OutputParser(tool_names=tools).parse(text) == expected
    events = stream(OutputParser(tool_names=tools), text, cuts)
    check_event_order(events)
    assert collect(events) == expected


# ----- garbage -----

garbage = st.lists(
    st.one_of(st.sampled_from(MARKERS), st.text(max_size=6), st.sampled_from(["<|", "{", '"', "}"])),
    max_size=14,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(
    text=garbage,
    cuts=st.lists(st.integers(0, 300), max_size=10),
    kind=st.sampled_from(["output", "output_in_reasoning", "reasoning", "tools"]),
)
def test_garbage_never_raises_and_is_split_invariant(text: str, cuts: list[int], kind: str) -> None:
    def make() -> Any:
        return {
            "output": lambda: OutputParser(tool_names=["f"]),
            "output_in_reasoning": lambda: OutputParser(starts_in_reasoning=True),
            "reasoning": ReasoningParser,
            "tools": ToolCallParser,
        }[kind]()

    whole = make().parse(text)
    events = stream(make(), text, cuts)
    check_event_order(events)
    assert collect(events) == whole


def reference_reasoning_split(text: str) -> tuple[str, str]:
    """A plain one-shot model of ReasoningParser() to check the streaming one against."""
    if not text.startswith("<think>"):
        return "", text
    rest = text[len("<think>") :]
    ends = [(rest.find(m), m) for m in ("</think>", SB) if m in rest]
    if not ends:
        return rest, ""
    pos, marker = min(ends)
    return rest[:pos], rest[pos + len(marker) if marker == "</think>" else pos :]


@settings(max_examples=200, deadline=None)
@given(text=garbage, cuts=st.lists(st.integers(0, 300), max_size=10))
def test_reasoning_parser_matches_reference(text: str, cuts: list[int]) -> None:
    out = collect(stream(ReasoningParser(), text, cuts))
    assert (out.reasoning, out.content) == reference_reasoning_split(text)
    assert out.tool_calls == ()


# ----- specific cases -----


def test_markers_split_mid_token() -> None:
    text = f"<think>r</think>c{SB}{CB}functions.get_weather:0{AB}{{}}{CE}{SE}tail"
    p = OutputParser()
    events = [e for ch in text for e in p.feed(ch)] + p.finish()
    out = collect(events)
    assert (out.reasoning, out.content) == ("r", "ctail")
    assert out.tool_calls[0].name == "get_weather" and out.tool_calls[0].arguments == "{}"


def test_missing_section_end_and_call_end_keep_the_call() -> None:
    out = ToolCallParser().parse(f'hi{SB}{CB}functions.f:0{AB}{{"a": 1')
    (call,) = out.tool_calls
    assert out.content == "hi"
    assert (call.id, call.name, call.arguments) == ("functions.f:0", "f", '{"a": 1')
    assert not call.complete and not call.valid_arguments
    out = ToolCallParser().parse(f"{SB}{CB}functions.f:0{AB}{{}}{CE}")
    assert out.tool_calls[0].complete and out.tool_calls[0].valid_arguments


def test_malformed_json_and_unknown_function_are_flagged_not_dropped() -> None:
    text = f"{SB}{CB}functions.nope:0{AB}not json{CE}{CB}functions.f:1{AB}[1]{CE}{SE}"
    a, b = ToolCallParser(tool_names=["f"]).parse(text).tool_calls
    assert (a.name, a.arguments, a.valid_arguments, a.known) == ("nope", "not json", False, False)
    assert (b.name, b.arguments, b.valid_arguments, b.known) == ("f", "[1]", False, True)


def test_new_call_closes_an_unfinished_one() -> None:
    text = f'{SB}{CB}functions.a:0{AB}{{"x"{CB}functions.b:1{CE}{SE}after'
    out = ToolCallParser().parse(text)
    assert [(c.name, c.arguments, c.complete) for c in out.tool_calls] == [
        ("a", '{"x"', False),
        ("b", "", True),
    ]
    assert out.content == "after"


def test_reasoning_ends_at_tool_section_and_flag_starts_inside() -> None:
    out = OutputParser().parse(f"<think>plan{SB}{CB}functions.f:0{AB}{{}}{CE}{SE}")
    assert out.reasoning == "plan" and out.content == "" and len(out.tool_calls) == 1
    assert OutputParser(starts_in_reasoning=True).parse("plan</think>answer") == ParsedOutput(
        "plan", "answer", ()
    )
    assert OutputParser().parse("plan</think>answer") == ParsedOutput("", "plan</think>answer", ())
    assert ReasoningParser().parse("<think>unterminated") == ParsedOutput("unterminated", "", ())
    assert ReasoningParser(starts_in_reasoning=True).parse("<thi") == ParsedOutput("<thi", "", ())
    assert ReasoningParser().parse("<thi") == ParsedOutput("", "<thi", ())


def test_streamed_arguments_arrive_before_the_call_ends() -> None:
    p = OutputParser()
    events = p.feed(f"{SB}{CB}functions.f:0{AB}" + '{"city": "Pa')
    kinds = [e.kind for e in events]
    assert kinds == [EventKind.TOOL_CALL_BEGIN, EventKind.TOOL_CALL_ARGUMENTS]
    assert events[0].tool_call is not None and events[0].tool_call.id == "functions.f:0"
    assert events[1].text == '{"city": "Pa'
    events = p.feed('ris"}<|tool_call_')  # the marker prefix is held back
    assert [e.text for e in events] == ['ris"}']
    events = p.feed("end|>") + p.finish()
    assert [e.kind for e in events] == [EventKind.TOOL_CALL_END]
