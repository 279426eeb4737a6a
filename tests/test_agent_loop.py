"""AgentLoop against a scripted transport that keeps a session the way the server does (a turn's new
messages and its reply appended together): what each turn sends, tool errors returned to the model,
max_steps, and resume from every way a session can end."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from k2serve.agent import AgentLoop, ResumeError, SamplingOptions, ToolRegistry, Transport, Turn
from k2serve.agent.transport import Message, assistant_message


def call(name: str, args: Any, i: int = 0) -> dict[str, Any]:
    arguments = args if isinstance(args, str) else json.dumps(args)
    return {
        "id": f"functions.{name}:{i}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def reply(*calls: dict[str, Any], content: str = "") -> Message:
    return assistant_message(content, "", calls)


class ScriptedTransport(Transport):
    """Replies from a script, in order; `sent` holds each turn's new messages; `sessions` the histories."""

    def __init__(self, replies: Sequence[Message]) -> None:
        self.replies = list(replies)
        self.sent: list[list[Message]] = []
        self.sessions: dict[str, list[Message]] = {}

    def create_session(self, messages: Sequence[Message], ttl_seconds: int | None, model: str | None) -> str:
        sid = f"sess_{len(self.sessions)}"
        self.sessions[sid] = list(messages)
        return sid

    def session_messages(self, session_id: str) -> list[Message]:
        return list(self.sessions[session_id])

    def delete_session(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None

    def chat(
        self,
        session_id: str,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]],
        tool_choice: str,
        sampling: SamplingOptions,
        model: str | None,
    ) -> Turn:
        assert messages, "a turn sends at least one new message"
        message = self.replies.pop(0)
        self.sent.append(list(messages))
        self.sessions[session_id] += [*messages, message]
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        return Turn(message, finish, 10 * len(self.sessions[session_id]), 8, 5, 0.01, 0.02)


@pytest.fixture
def tools() -> ToolRegistry:
    reg = ToolRegistry()

    @reg.register
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @reg.register
    def boom() -> str:
        raise RuntimeError("tool failure")

    return reg


def test_tool_calls_run_and_their_results_go_back(tools: ToolRegistry) -> None:
    t = ScriptedTransport(
        [reply(call("add", {"a": 1, "b": 2}), call("add", {"a": 3, "b": 4}, 1)), reply(content="3 and 7")]
    )
    result = AgentLoop(t, tools, system_prompt="be brief", temperature=0).run("add things")
    assert result.stop_reason == "final" and result.final_answer == "3 and 7"
    assert t.sent[0] == [{"role": "user", "content": "add things"}]
    assert t.sent[1] == [
        {"role": "tool", "tool_call_id": "functions.add:0", "content": "3"},
        {"role": "tool", "tool_call_id": "functions.add:1", "content": "7"},
    ]
    assert t.sessions[result.session_id] == [{"role": "system", "content": "be brief"}, *result.messages]
    first, last = result.steps
    assert [c.content for c in first.tool_calls] == ["3", "7"] and last.tool_calls == ()
    assert first.computed_tokens == first.prompt_tokens - 8 and first.ttft_s == 0.01


def test_model_mistakes_are_returned_not_raised(tools: ToolRegistry) -> None:
    bad = [
        call("mul", {"a": 1}),
        call("add", '{"a": 1,', 1),
        call("add", {"a": "x", "b": 1}, 2),
        call("boom", {}, 3),
    ]
    t = ScriptedTransport([reply(*bad), reply(content="sorry")])
    result = AgentLoop(t, tools).run("go")
    assert result.final_answer == "sorry"
    ran = result.steps[0].tool_calls
    assert [r.error for r in ran] == ["unknown_tool", "bad_arguments", "bad_arguments", "tool_raised"]
    assert [m["tool_call_id"] for m in t.sent[1]] == [c["id"] for c in bad]
    assert all(m["content"].startswith("error: ") for m in t.sent[1])
    assert "RuntimeError: tool failure" in t.sent[1][3]["content"]


def test_max_steps_leaves_the_last_calls_pending(tools: ToolRegistry) -> None:
    t = ScriptedTransport([reply(call("add", {"a": i, "b": 1})) for i in range(3)])
    seen: list[int] = []
    loop = AgentLoop(t, tools, max_steps=3, tool_choice="required", on_step=lambda s: seen.append(s.index))
    result = loop.run("go")
    assert result.stop_reason == "max_steps" and result.final_answer is None and len(result.steps) == 3
    assert seen == [0, 1, 2]
    assert [len(s.tool_calls) for s in result.steps] == [1, 1, 0]
    assert result.pending_tool_calls == (call("add", {"a": 2, "b": 1}),)
    assert t.sessions[result.session_id][-1]["tool_calls"] == [call("add", {"a": 2, "b": 1})]


def test_resume_runs_the_pending_calls_and_continues(tools: ToolRegistry) -> None:
    t = ScriptedTransport([reply(call("add", {"a": 1, "b": 1})), reply(call("add", {"a": 5, "b": 5}))])
    first = AgentLoop(t, tools, max_steps=2).run("go")  # "dies" with add(5, 5) pending
    before = t.session_messages(first.session_id)
    t.replies = [reply(content="done")]
    result = AgentLoop.resume(first.session_id, t, tools)
    assert [r.content for r in result.resumed_tool_calls] == ["10"]
    assert t.sent[-1] == [{"role": "tool", "tool_call_id": "functions.add:0", "content": "10"}]
    after = t.session_messages(first.session_id)
    assert after[: len(before)] == before and after[len(before) :] == list(result.messages)
    assert result.final_answer == "done"


def test_resume_after_some_results_runs_only_the_rest(tools: ToolRegistry) -> None:
    t = ScriptedTransport([reply(content="ok")])
    sid = t.create_session([{"role": "user", "content": "go"}], None, None)
    t.sessions[sid] += [
        reply(call("add", {"a": 1, "b": 2}), call("add", {"a": 3, "b": 4}, 1)),
        {"role": "tool", "tool_call_id": "functions.add:0", "content": "3"},
    ]
    result = AgentLoop.resume(sid, t, tools)
    assert t.sent == [[{"role": "tool", "tool_call_id": "functions.add:1", "content": "7"}]]
    assert result.final_answer == "ok"


def test_resume_of_a_finished_session_returns_its_answer(tools: ToolRegistry) -> None:
    t = ScriptedTransport([])
    sid = t.create_session([{"role": "user", "content": "go"}, reply(content="42")], None, None)
    result = AgentLoop.resume(sid, t, tools)
    assert (
        result.stop_reason == "final" and result.final_answer == "42" and result.steps == () and t.sent == []
    )


@pytest.mark.parametrize(
    ("history", "reason"),
    [
        ([{"role": "system", "content": "s"}], "no assistant reply"),
        (
            [{"role": "user", "content": "u"}, reply(content="a"), {"role": "user", "content": "v"}],
            "user message",
        ),
        (
            [
                reply(call("add", {"a": 1, "b": 1})),
                {"role": "tool", "tool_call_id": "functions.add:0", "content": "2"},
            ],
            "every tool call has its result",
        ),
    ],
)
def test_resume_refuses_what_it_cannot_continue(
    tools: ToolRegistry, history: list[Message], reason: str
) -> None:
    t = ScriptedTransport([])
    sid = t.create_session(history, None, None)
    with pytest.raises(ResumeError, match=reason) as e:
        AgentLoop.resume(sid, t, tools)
    assert e.value.session_id == sid


def test_arguments_are_checked(tools: ToolRegistry) -> None:
    t = ScriptedTransport([])
    with pytest.raises(ValueError, match="max_steps"):
        AgentLoop(t, tools, max_steps=0)
    with pytest.raises(ValueError, match="tool_choice"):
        AgentLoop(t, tools, tool_choice="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one registered tool"):
        AgentLoop(t, ToolRegistry(), tool_choice="required")
    with pytest.raises(ValueError, match="max_tokens"):
        AgentLoop(t, tools, max_tokens=0)
    with pytest.raises(TypeError):
        AgentLoop(t, tools, temprature=0)
