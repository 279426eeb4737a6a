"""AgentLoop: send the turn's new messages, run the tools the model called, send their results, repeat.

The loop keeps no state of its own between turns: the conversation lives in the server's session
(Redis), each turn sends only what is new (the user message, or the tool results), and the server
records a turn (new messages + reply) in one step once it finishes. So a client that dies at any
point leaves a session that ends with an assistant reply, and `AgentLoop.resume` in another process
picks up from it: pending tool calls are run and the loop goes on.

    tools = ToolRegistry()
    tools.register(add)
    loop = AgentLoop(HTTPTransport.connect(url, key), tools, tool_choice="auto", max_tokens=256)
    result = loop.run("What is 2 + 3?")      # result.final_answer, result.steps[i].cached_tokens, ...
    result = AgentLoop.resume(session_id, HTTPTransport.connect(url, key), tools)   # elsewhere
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from k2serve.agent.errors import ResumeError
from k2serve.agent.tools import ToolRegistry
from k2serve.agent.transport import Message, SamplingOptions, Transport, Turn

__all__ = ["AgentLoop", "AgentResult", "StepRecord", "ToolCallRecord", "pending_tool_calls"]

ToolChoice = Literal["auto", "required", "none"]


@dataclass(frozen=True)
class ToolCallRecord:
    """One tool call the loop ran: what the model asked for, what went back (`content`), and
    `error` ("unknown_tool", "bad_arguments", "tool_raised" or None); duration_s is the tool's own time."""

    id: str
    name: str
    arguments: str
    content: str
    error: str | None
    duration_s: float


@dataclass(frozen=True)
class StepRecord:
    """One model turn: the server's usage (prompt_tokens, of which cached_tokens came from a KV
    cache; completion_tokens), time to first output (ttft_s) and to the end (latency_s) in seconds,
    the finish reason, and the tool calls of its reply that the loop ran (none for a final answer,
    none when max_steps stopped the loop at this step: see AgentResult.pending_tool_calls)."""

    index: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    latency_s: float
    finish_reason: str
    tool_calls: tuple[ToolCallRecord, ...]

    @property
    def computed_tokens(self) -> int:
        """Prompt tokens the server computed for this turn (not served from a cache)."""
        return self.prompt_tokens - self.cached_tokens


@dataclass(frozen=True)
class AgentResult:
    """How a run ended. stop_reason: "final" (a reply without tool calls: `final_answer` is its
    content, cut short when `steps[-1].finish_reason` is "length") or "max_steps" (the last reply's calls are `pending_tool_calls`, not run; `resume`
    runs them). messages: what this run added to the session, in order (sent messages and replies).
    resumed_tool_calls: the calls from the session's history that `resume` ran before its first step."""

    session_id: str
    stop_reason: Literal["final", "max_steps"]
    final_answer: str | None
    steps: tuple[StepRecord, ...]
    messages: tuple[Message, ...]
    pending_tool_calls: tuple[Mapping[str, Any], ...] = ()
    resumed_tool_calls: tuple[ToolCallRecord, ...] = ()


def pending_tool_calls(
    session_id: str, history: Sequence[Message]
) -> tuple[list[Mapping[str, Any]], Message]:
    """The tool calls of the session's last assistant reply that have no result yet, and that reply.

    Results answer the reply's calls in order (the tool messages that follow it). Raises ResumeError
    when the history has no reply, or ends with a message the loop cannot continue from (a user
    message without reply, or tool results for every call but no reply to them: the chat API takes
    at least one new message per turn)."""
    last = max((i for i, m in enumerate(history) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise ResumeError(session_id, "it has no assistant reply yet: start it with run()")
    after = history[last + 1 :]
    if any(m.get("role") != "tool" for m in after):
        role = next(m.get("role") for m in after if m.get("role") != "tool")
        raise ResumeError(session_id, f"it ends with a {role} message that has no reply: send it with run()")
    calls = list(history[last].get("tool_calls") or ())
    if after and len(after) >= len(calls):
        raise ResumeError(session_id, "every tool call has its result but no reply follows: use run()")
    return calls[len(after) :], history[last]


class AgentLoop:
    """An agent on one session. `transport`: an HTTPTransport or GRPCTransport. `tools`: what the model
    may call (sent with every turn). `max_steps`: model turns per run() / resume(). `session_id`: an
    existing session to continue (None: run() creates one, with `system_prompt` as its first message).
    `tool_choice`: "auto", "required" (every turn must call a tool, grammar-enforced, so the loop only
    ends at max_steps) or "none". `sampling`: SamplingOptions fields (temperature, top_p, max_tokens,
    seed, stop, logprobs). `on_step`: called with each step's record once its tools ran (progress,
    logging; an exception from it ends the run). Not thread-safe: one run at a time."""

    def __init__(
        self,
        transport: Transport,
        tools: ToolRegistry,
        model: str | None = None,
        max_steps: int = 16,
        session_id: str | None = None,
        tool_choice: ToolChoice = "auto",
        system_prompt: str | None = None,
        ttl_seconds: int | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
        **sampling: Any,
    ) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if tool_choice not in ("auto", "required", "none"):
            raise ValueError(f'tool_choice must be "auto", "required" or "none", got {tool_choice!r}')
        if tool_choice == "required" and not len(tools):
            raise ValueError('tool_choice "required" needs at least one registered tool')
        self.transport = transport
        self.tools = tools
        self.model = model
        self.max_steps = max_steps
        self.session_id = session_id
        self.tool_choice = tool_choice
        self.system_prompt = system_prompt
        self.ttl_seconds = ttl_seconds
        self.on_step = on_step
        self.sampling = SamplingOptions(**sampling)

    def run(self, user_message: str) -> AgentResult:
        """Send `user_message` and loop until a final answer or max_steps (see AgentResult)."""
        if self.session_id is None:
            first = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            self.session_id = self.transport.create_session(first, self.ttl_seconds, self.model)
        return self._loop(self.session_id, [{"role": "user", "content": user_message}], ())

    @classmethod
    def resume(
        cls, session_id: str, transport: Transport, tools: ToolRegistry, **options: Any
    ) -> AgentResult:
        """Continue session `session_id` where a (dead) client left off, with a new AgentLoop (`options`
        as for the constructor). A session ending in a final answer returns it with no step; pending
        tool calls are run and the loop continues. Resume only once the dead client's last request
        has ended (the server cancels it when it sees the disconnect): a turn still in flight would be
        recorded as well, and the session would hold two answers to the same calls. Raises
        ResumeError (see `pending_tool_calls`)."""
        loop = cls(transport, tools, session_id=session_id, **options)
        calls, reply = pending_tool_calls(session_id, transport.session_messages(session_id))
        if not calls:
            content = reply.get("content") or ""
            return AgentResult(session_id, "final", content, (), ())
        ran = tuple(loop._run_tool(c) for c in calls)
        return loop._loop(session_id, [_tool_message(r) for r in ran], ran)

    # ---- the loop ----------------------------------------------------------------------------------
    def _loop(self, sid: str, new: list[Message], resumed: tuple[ToolCallRecord, ...]) -> AgentResult:
        steps: list[StepRecord] = []
        added: list[Message] = []
        tools = self.tools.openai_tools() if self.tool_choice != "none" else []
        for index in range(self.max_steps):
            turn = self.transport.chat(sid, new, tools, self.tool_choice, self.sampling, self.model)
            added += [*new, turn.message]
            calls = turn.tool_calls
            if not calls or index == self.max_steps - 1:
                steps.append(_record(index, turn, ()))
                self._report(steps[-1])
                final = None if calls else (turn.message.get("content") or "")
                return AgentResult(
                    sid, "max_steps" if calls else "final", final, tuple(steps), tuple(added), calls, resumed
                )
            ran = tuple(self._run_tool(c) for c in calls)
            steps.append(_record(index, turn, ran))
            self._report(steps[-1])
            new = [_tool_message(r) for r in ran]
        raise AssertionError("unreachable: the last step returns")

    def _report(self, step: StepRecord) -> None:
        if self.on_step is not None:
            self.on_step(step)

    def _run_tool(self, call: Mapping[str, Any]) -> ToolCallRecord:
        fn = call.get("function") or {}
        name, arguments = str(fn.get("name", "")), str(fn.get("arguments", ""))
        t0 = time.perf_counter()
        outcome = self.tools.call(name, arguments)
        return ToolCallRecord(
            str(call.get("id", "")), name, arguments, outcome.content, outcome.error, time.perf_counter() - t0
        )


def _tool_message(r: ToolCallRecord) -> Message:
    return {"role": "tool", "tool_call_id": r.id, "content": r.content}


def _record(index: int, turn: Turn, ran: tuple[ToolCallRecord, ...]) -> StepRecord:
    return StepRecord(
        index,
        turn.prompt_tokens,
        turn.cached_tokens,
        turn.completion_tokens,
        turn.ttft_s,
        turn.latency_s,
        turn.finish_reason,
        ran,
    )
