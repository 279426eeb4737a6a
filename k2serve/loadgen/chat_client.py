"""ChatClient: the chat dialects agents speak, streamed and timed: OpenAI `/v1/chat/completions`,
Anthropic `/v1/messages` and OpenAI `/v1/responses`; one request per prompt, or tool-loop conversations.

Tool-loop mode (`agent_turns`): each request of the dataset opens a conversation of `agent_turns` turns.
Every request declares one tool (`lookup`, an argument from a small enum so that a call is short) and
forces it by name (`tool_choice` function / tool), so even a model with random weights calls it on every
turn. Each reply is followed by a synthetic tool result (`tool_result_len` seeded random words) for each
of its tool calls and a new user turn (input-length random words). A reply without a complete tool call
(cut by max_tokens) is followed by the user turn alone; the record's `tool_calls` says which happened.
The history reaches the server one of three ways (`history`):

- "resend": the whole conversation in every request, as the OpenAI and Anthropic SDKs do;
- "session": a k2serve agent session (`POST /v1/sessions`, then chat requests with `session_id` carry only
  the new messages; the session is deleted at the end), /v1/chat/completions only;
- "previous_response_id": the Responses API's chaining (only the new input items), /v1/responses only.

Every turn is a record: TTFT from the first streamed output (text, reasoning or tool call), the prompt and
cached tokens from the usage each API reports (`prompt_tokens_details.cached_tokens`,
`cache_read_input_tokens`, `input_tokens_details.cached_tokens`), and the size of the body sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from k2serve.loadgen.dataset import BenchRequest, random_words
from k2serve.loadgen.http_client import HTTPClient
from k2serve.loadgen.record import RequestRecord

TOOL_NAME = "lookup"
TOOL_DESCRIPTION = "Look a topic up in the knowledge base."
TOOL_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"topic": {"type": "string", "enum": ["alpha", "beta", "gamma"]}},
    "required": ["topic"],
    "additionalProperties": False,
}


@dataclass
class ToolCall:
    """A complete tool call of a reply: its id (what the tool result refers to), name and JSON arguments."""

    id: str
    name: str
    arguments: str


@dataclass
class Reply:
    """What a streamed reply said, enough to carry the conversation on: the items to append to the
    history (in the API's own shape), its tool calls, and the Responses API's response id."""

    history_items: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    response_id: str | None = None


class Dialect:
    """One API's request bodies, new conversation items and stream events."""

    path = ""
    needs_model = False  # the API refuses a request without "model"
    takes_ignore_eos = False  # a vLLM extension of the API (k2serve's too): output of exactly max_tokens

    def user(self, text: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def tool_results(self, calls: list[ToolCall], result: str, text: str) -> list[dict[str, Any]]:
        """The items after a reply with `calls`: a `result` for each, then the user's `text`."""
        raise NotImplementedError

    def body(self, items: list[dict[str, Any]], max_tokens: int, tools: bool) -> dict[str, Any]:
        """A streamed request of the conversation `items`; with `tools`, the tool declared and forced."""
        raise NotImplementedError

    def on_event(self, event: dict[str, Any], now: float, rec: RequestRecord, state: dict[str, Any]) -> bool:
        """Record `event` (arrived at `now`) in `rec`, gathering the reply in `state`; True at the last one."""
        raise NotImplementedError

    def reply(self, state: dict[str, Any]) -> Reply:
        raise NotImplementedError


def _output(rec: RequestRecord, now: float) -> None:
    """An event carrying output tokens arrived at `now`."""
    if rec.first_token_s is None:
        rec.first_token_s = now
    rec.chunk_s.append(now)


class ChatCompletions(Dialect):
    path = "/v1/chat/completions"
    takes_ignore_eos = True

    def user(self, text: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": text}]

    def tool_results(self, calls: list[ToolCall], result: str, text: str) -> list[dict[str, Any]]:
        return [{"role": "tool", "tool_call_id": c.id, "content": result} for c in calls] + self.user(text)

    def body(self, items: list[dict[str, Any]], max_tokens: int, tools: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": items,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if tools:
            fn = {"name": TOOL_NAME, "description": TOOL_DESCRIPTION, "parameters": TOOL_PARAMETERS}
            body["tools"] = [{"type": "function", "function": fn}]
            body["tool_choice"] = {"type": "function", "function": {"name": TOOL_NAME}}
        return body

    def on_event(self, event: dict[str, Any], now: float, rec: RequestRecord, state: dict[str, Any]) -> bool:
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
                _output(rec, now)
            state["content"] = state.get("content", "") + (delta.get("content") or "")
            state["reasoning"] = state.get("reasoning", "") + (delta.get("reasoning_content") or "")
            calls = state.setdefault("calls", {})
            for tc in delta.get("tool_calls") or []:
                call = calls.setdefault(tc.get("index", 0), {"id": "", "name": "", "arguments": ""})
                fn = tc.get("function") or {}
                call["id"] = tc.get("id") or call["id"]
                call["name"] = fn.get("name") or call["name"]
                call["arguments"] += fn.get("arguments") or ""
            state["finish_reason"] = choice.get("finish_reason") or state.get("finish_reason")
        usage = event.get("usage")
        if usage:
            rec.output_tokens = usage.get("completion_tokens")
            rec.prompt_tokens = usage.get("prompt_tokens")
            rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return False  # the stream ends with data: [DONE]

    def reply(self, state: dict[str, Any]) -> Reply:
        calls = [ToolCall(**c) for _, c in sorted(state.get("calls", {}).items())]
        complete = [c for c in calls if c.id and c.name and _is_json(c.arguments)]
        if state.get("finish_reason") == "length":
            complete = []  # cut by max_tokens: the server dropped the unfinished call
        message: dict[str, Any] = {"role": "assistant", "content": state.get("content") or None}
        if state.get("reasoning"):  # K2's reasoning goes back with the turn, as a session keeps it
            message["reasoning_content"] = state["reasoning"]
        if complete:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in complete
            ]
        return Reply([message], complete)


class AnthropicMessages(Dialect):
    path = "/v1/messages"
    needs_model = True

    def user(self, text: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": text}]

    def tool_results(self, calls: list[ToolCall], result: str, text: str) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = [
            {"type": "tool_result", "tool_use_id": c.id, "content": result} for c in calls
        ]
        return [{"role": "user", "content": [*blocks, {"type": "text", "text": text}]}]

    def body(self, items: list[dict[str, Any]], max_tokens: int, tools: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": items, "max_tokens": max_tokens, "stream": True}
        if tools:
            body["tools"] = [
                {"name": TOOL_NAME, "description": TOOL_DESCRIPTION, "input_schema": TOOL_PARAMETERS}
            ]
            body["tool_choice"] = {"type": "tool", "name": TOOL_NAME}
        return body

    def on_event(self, event: dict[str, Any], now: float, rec: RequestRecord, state: dict[str, Any]) -> bool:
        kind = event.get("type")
        blocks: dict[int, dict[str, Any]] = state.setdefault("blocks", {})
        if kind == "message_start":
            self._usage(rec, (event.get("message") or {}).get("usage") or {})
        elif kind == "content_block_start":
            block = dict(event.get("content_block") or {})
            if block.get("type") == "tool_use":
                block["partial_json"] = ""
                _output(rec, now)
            blocks[event.get("index", len(blocks))] = block
        elif kind == "content_block_delta":
            _output(rec, now)
            block = blocks.setdefault(event.get("index", 0), {"type": "text", "text": ""})
            delta = event.get("delta") or {}
            for key, src in (("text", "text"), ("thinking", "thinking"), ("signature", "signature")):
                if src in delta:
                    block[key] = block.get(key, "") + delta[src]
            if "partial_json" in delta:
                block["partial_json"] = block.get("partial_json", "") + delta["partial_json"]
        elif kind == "message_delta":
            self._usage(rec, event.get("usage") or {})
            state["stop_reason"] = (event.get("delta") or {}).get("stop_reason")
        return kind == "message_stop"

    @staticmethod
    def _usage(rec: RequestRecord, usage: dict[str, Any]) -> None:
        if "input_tokens" in usage:
            cached = usage.get("cache_read_input_tokens") or 0
            rec.prompt_tokens = (
                usage["input_tokens"] + cached + (usage.get("cache_creation_input_tokens") or 0)
            )
            rec.cached_tokens = cached
        if "output_tokens" in usage:
            rec.output_tokens = usage["output_tokens"]

    def reply(self, state: dict[str, Any]) -> Reply:
        content: list[dict[str, Any]] = []
        calls: list[ToolCall] = []
        for _, block in sorted(state.get("blocks", {}).items()):
            if block.get("type") == "tool_use":
                partial = block.pop("partial_json", "")
                if state.get("stop_reason") == "max_tokens" or not _is_json(partial or "{}"):
                    continue  # cut by max_tokens: no complete call to answer
                block["input"] = json.loads(partial or "{}")
                calls.append(ToolCall(block["id"], block["name"], partial))
            content.append(block)
        return Reply([{"role": "assistant", "content": content}] if content else [], calls)


class OpenAIResponses(Dialect):
    path = "/v1/responses"

    def user(self, text: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": text}]

    def tool_results(self, calls: list[ToolCall], result: str, text: str) -> list[dict[str, Any]]:
        outputs = [{"type": "function_call_output", "call_id": c.id, "output": result} for c in calls]
        return outputs + self.user(text)

    def body(self, items: list[dict[str, Any]], max_tokens: int, tools: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"input": items, "max_output_tokens": max_tokens, "stream": True}
        if tools:
            fn = {"type": "function", "name": TOOL_NAME, "description": TOOL_DESCRIPTION}
            body["tools"] = [{**fn, "parameters": TOOL_PARAMETERS}]
            body["tool_choice"] = {"type": "function", "name": TOOL_NAME}
        return body

    def on_event(self, event: dict[str, Any], now: float, rec: RequestRecord, state: dict[str, Any]) -> bool:
        kind = str(event.get("type", ""))
        if kind.endswith(".delta") or (
            kind == "response.output_item.added" and (event.get("item") or {}).get("type") == "function_call"
        ):
            _output(rec, now)
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            response = event.get("response") or {}
            state["response"] = response
            usage = response.get("usage") or {}
            rec.prompt_tokens = usage.get("input_tokens")
            rec.output_tokens = usage.get("output_tokens")
            rec.cached_tokens = (usage.get("input_tokens_details") or {}).get("cached_tokens", 0)
            if kind == "response.failed":
                rec.error = "response_failed"
                rec.error_detail = str(response.get("error"))[:500]
            return True
        return False

    def reply(self, state: dict[str, Any]) -> Reply:
        response = state.get("response") or {}
        items = [dict(i) for i in response.get("output") or []]
        for item in items:
            item.pop("status", None)  # an output field, not an input one
        calls = [
            ToolCall(i["call_id"], i["name"], i["arguments"])
            for i in items
            if i.get("type") == "function_call" and _is_json(i.get("arguments", ""))
        ]
        return Reply(items, calls, response.get("id"))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


DIALECTS: dict[str, type[Dialect]] = {
    d.path: d for d in (ChatCompletions, AnthropicMessages, OpenAIResponses)
}


class ChatClient(HTTPClient):
    """Streams each request to `endpoint` (one of DIALECTS) as one user message of the request's text,
    asking for `output_len` tokens (exactly, with `ignore_eos`, on /v1/chat/completions; at most on the
    other two, whose APIs have no such field); or, with `agent_turns`,
    runs each request as a tool-loop conversation (see the module doc). The API key goes as
    `Authorization: Bearer`, which k2serve's Anthropic API accepts too."""

    def __init__(
        self,
        url: str,
        endpoint: str,
        model: str | None,
        api_key: str | None,
        timeout_s: float,
        temperature: float = 0.0,
        max_connections: int | None = None,
        *,
        agent_turns: int | None = None,
        history: str = "resend",
        tool_result_len: int = 64,
        input_len: tuple[int, int] = (32, 32),
        seed: int = 0,
    ) -> None:
        super().__init__(url, model, api_key, timeout_s, temperature, max_connections)
        self.dialect = DIALECTS[endpoint]()
        self._turns = agent_turns
        self._history = history
        self._tool_result_len = tool_result_len
        self._input_len = input_len
        self._seed = seed
        self._model_lock = asyncio.Lock()

    @property
    def span_timeout_s(self) -> float:
        return self.timeout_s * (self._turns or 1) + (self.timeout_s if self._history == "session" else 0.0)

    async def _finish(self, body: dict[str, Any]) -> dict[str, Any]:
        """`body` with the sampling settings and the model, which Anthropic's API requires: when none was
        given, the server's first in GET /v1/models (asked once)."""
        body["temperature"] = self._temperature
        if self._model is None and self.dialect.needs_model:
            async with self._model_lock:
                if self._model is None:
                    models = await self._http.get("/v1/models")
                    models.raise_for_status()
                    listed = models.json().get("data") or [{}]
                    if not isinstance(listed[0].get("id"), str):
                        raise httpx.HTTPError(
                            f"GET /v1/models names no model: give one ({models.text[:200]})"
                        )
                    self._model = listed[0]["id"]
        if self._model is not None:
            body["model"] = self._model
        return body

    async def send(self, req: BenchRequest, t0: float) -> RequestRecord:
        rec = self.new_record(req, t0)
        if req.text is None:  # config validation keeps token-id datasets off the chat endpoints
            raise ValueError(f"request {req.index} has no text for {self.dialect.path}")
        body = self.dialect.body(self.dialect.user(req.text), req.output_len, tools=False)
        if self.dialect.takes_ignore_eos:
            body["ignore_eos"] = True
        await self.guarded(rec, t0, self._turn(body, rec, t0))
        return rec

    async def _turn(self, body: dict[str, Any], rec: RequestRecord, t0: float) -> Reply:
        """One streamed request; the reply (empty when it failed, the failure in `rec`)."""
        state: dict[str, Any] = {}
        data = json.dumps(await self._finish(body)).encode()
        rec.body_bytes = len(data)

        def on_event(event: dict[str, Any], now: float) -> bool:
            return self.dialect.on_event(event, now, rec, state)

        if not await self.post_stream(self.dialect.path, data, rec, t0, on_event):
            return Reply()
        if rec.output_tokens is None and rec.error is None:
            rec.output_tokens = len(rec.chunk_s)  # no usage sent: chunks are the best count there is
        return self.dialect.reply(state)

    async def send_all(self, req: BenchRequest, t0: float) -> list[RequestRecord]:
        """The request, or in tool-loop mode its conversation: a record per turn, up to the first failed
        one. When the run cancels the conversation, the turn in flight is recorded as cancelled."""
        if self._turns is None:
            return [await self.send(req, t0)]
        records: list[RequestRecord] = []
        session_id: str | None = None
        try:
            if self._history == "session":
                rec = self._turn_record(req, t0, 0)
                session_id = await self._create_session(rec, t0)
                if session_id is None:
                    return [rec]
            await self._conversation(req, t0, records, session_id)
        except asyncio.CancelledError:
            if not records:  # cancelled while creating the session
                records.append(self._turn_record(req, t0, 0))
            if records[-1].finish_s is None:
                records[-1].error, records[-1].error_detail = "cancelled", "still running when the run ended"
                records[-1].finish_s = time.perf_counter() - t0
            return records
        finally:
            if session_id is not None:
                await self._delete_session(session_id)
        return records

    def _turn_record(self, req: BenchRequest, t0: float, turn: int) -> RequestRecord:
        rec = self.new_record(req, t0)
        rec.conversation, rec.turn = req.index, turn
        return rec

    async def _conversation(
        self, req: BenchRequest, t0: float, records: list[RequestRecord], session_id: str | None
    ) -> None:
        assert self._turns is not None and req.text is not None
        rng = np.random.default_rng([self._seed, 3, req.index])
        history: list[dict[str, Any]] = []
        new = self.dialect.user(req.text)
        previous: str | None = None
        for turn in range(self._turns):
            rec = self._turn_record(req, t0, turn)
            records.append(rec)
            items = new if self._history != "resend" else history + new
            body = self.dialect.body(items, req.output_len, tools=True)
            if session_id is not None:
                body["session_id"] = session_id
            if previous is not None:
                body["previous_response_id"] = previous
            reply = await self.guarded(rec, t0, self._turn(body, rec, t0)) or Reply()
            rec.tool_calls = len(reply.tool_calls)
            if not rec.ok:
                return
            history += new + reply.history_items
            if self._history == "previous_response_id":
                previous = reply.response_id
            result = random_words(rng, self._tool_result_len)
            text = random_words(rng, int(rng.integers(self._input_len[0], self._input_len[1] + 1)))
            new = (
                self.dialect.tool_results(reply.tool_calls, result, text)
                if reply.tool_calls
                else self.dialect.user(text)
            )

    async def _create_session(self, rec: RequestRecord, t0: float) -> str | None:
        """POST /v1/sessions; its id, or None with the failure recorded in `rec` (as a failed first turn)."""

        async def create() -> str | None:
            body = {} if self._model is None else {"model": self._model}
            resp = await self._http.post("/v1/sessions", json=body)
            if resp.status_code != 200:
                rec.error, rec.error_detail = f"session_create:{resp.status_code}", resp.text[:500]
                return None
            return str(resp.json()["id"])

        return await self.guarded(rec, t0, create())

    async def _delete_session(self, session_id: str) -> None:
        """DELETE the conversation's session (best effort: it expires anyway)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._http.delete(f"/v1/sessions/{session_id}")
        except Exception:  # noqa: BLE001 - cleanup only; the run's results stand
            return
