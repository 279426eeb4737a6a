"""POST /v1/chat/completions: messages -> prompt ids -> backend -> reasoning, content and tool calls.

The request goes through the chat path every front door shares (`k2serve.chat.request`: roles,
tools, tool_choice, response_format, the prompt and its grammar, the output parser); this module
adds what is HTTP's own: the OpenAI body and response shapes, sampling fields, SSE, sessions by
API key, and the errors as 400s naming the field.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from k2serve.api.errors import APIError, bad_request, from_backend_error
from k2serve.api.metrics import RequestTracker
from k2serve.api.outputs import chat_logprobs, usage
from k2serve.api.params import per_choice, sampling_params
from k2serve.api.runner import (
    CLIENT_CLOSED,
    DONE,
    AppState,
    SSEResponse,
    events,
    merged,
    sse,
    start,
    unless_disconnected,
)
from k2serve.api.schemas import ChatCompletionRequest
from k2serve.api.session_routes import session_context
from k2serve.chat.detok import OutputText
from k2serve.chat.parsers import DeltaEvent, EventKind, OutputParser, ReasoningParser, collect
from k2serve.chat.request import ChatRequestError, finish_reason, plan_chat, reply_message
from k2serve.engine.protocol import BackendError, GenerateRequest, TokenEvent
from k2serve.sessions.service import TurnRecorder

ENDPOINT = "chat"
MAX_CHOICES = 16


async def chat_completion(state: AppState, body: ChatCompletionRequest, http: Request) -> Response:
    tracker = state.metrics.tracker(ENDPOINT)
    try:
        return await _chat_completion(state, body, http, tracker)
    except APIError as e:
        tracker.finish(e.status, None)
        raise


async def _chat_completion(
    state: AppState, body: ChatCompletionRequest, http: Request, tracker: RequestTracker
) -> Response:
    model = state.check_model(body.model)
    state.admit()
    backend, tok = state.backend, state.backend.tokenizer
    if body.n is not None and not isinstance(body.n, bool) and body.n > MAX_CHOICES:
        raise bad_request(f"n={body.n} is too large: at most {MAX_CHOICES} choices per request", "n")
    if body.n not in (None, 1) and body.session_id is not None:
        raise bad_request("n > 1 cannot continue a session: a session records one reply per turn", "n")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    try:
        plan = plan_chat(
            [m.model_dump(exclude_none=True) for m in body.messages],
            [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
            body.tool_choice if isinstance(body.tool_choice, str | None) else body.tool_choice.model_dump(),
            None
            if body.response_format is None
            else body.response_format.model_dump(by_alias=True, exclude_none=True),
            parallel_tool_calls=body.parallel_tool_calls is not False,
        )
    except ChatRequestError as e:
        raise bad_request(str(e), e.param) from e
    history: list[dict[str, Any]] = []
    hint, owner = None, None
    if body.session_id is not None:
        if state.sessions is None:
            raise bad_request(
                "sessions are not enabled on this server (start it with a Redis URL)", "session_id"
            )
        owner = state.owner(http)
        history, hint = await session_context(state.sessions, body.session_id, owner)
    try:
        prompt = await asyncio.to_thread(plan.prompt, state.encoder, history)
    except ChatRequestError as e:
        raise bad_request(str(e), e.param) from e

    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = sampling_params(
        body,
        prompt_len=len(prompt),
        prompt_param="messages",
        max_model_len=backend.max_model_len,
        max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
        max_tokens_param=max_param,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        logprobs_param="top_logprobs",
        skip_special_tokens=True if body.skip_special_tokens is None else body.skip_special_tokens,
    )
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    names = {"prompt_token_ids": "messages", "logprobs": "top_logprobs", "max_tokens": max_param}
    streams: list[AsyncGenerator[TokenEvent, None]] = []
    choices: list[_Choice] = []
    started: list[str] = []
    for j, choice_params in enumerate(per_choice(params)):  # n requests, one per choice
        choice_id = rid if j == 0 else f"{rid}-{j}"
        request = GenerateRequest(choice_id, prompt, choice_params, plan.structured, hint)
        try:
            stream = await start(state, request, names)
        except APIError:
            for earlier in started:  # the choices admitted before this one was refused
                await backend.abort(earlier)
            raise
        started.append(choice_id)
        streams.append(
            events(state, choice_id, stream, tracker if j == 0 else state.metrics.tracker(ENDPOINT))
        )
        text = plan.output_text(
            tok,
            stop=params.stop,
            stop_token_ids=params.stop_token_ids,
            skip_special_tokens=params.skip_special_tokens,
        )
        choices.append(_Choice(text, plan.parser()))
    on_finish = None
    if hint is not None and owner is not None:
        on_finish = state.sessions.turn_recorder(hint.session_id, owner, plan.messages, prompt)
    head = {"id": rid, "created": int(time.time()), "model": model}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return SSEResponse(_stream(state, head, streams, choices, tracker, include_usage, on_finish))
    ok, result = await unless_disconnected(
        http, _collect(state, head, streams, choices, tracker, body.return_token_ids, on_finish)
    )
    if not ok:
        tracker.finish(CLIENT_CLOSED, None)
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(result)


def _with_reasoning_alias(message: dict[str, Any]) -> dict[str, Any]:
    """`message` with `reasoning` next to `reasoning_content` (the name vLLM now emits), when it has one."""
    if "reasoning_content" not in message:
        return message
    return {**message, "reasoning": message["reasoning_content"]}


def _deltas(parsed: list[DeltaEvent]) -> list[dict[str, Any]]:
    """Parser events as OpenAI message deltas, adjacent pieces of the same kind merged."""
    out: list[dict[str, Any]] = []
    for ev in parsed:
        if ev.kind in (EventKind.REASONING, EventKind.CONTENT):
            key = "reasoning_content" if ev.kind is EventKind.REASONING else "content"
            if out and list(out[-1]) == [key]:
                out[-1][key] += ev.text
            else:
                out.append({key: ev.text})
        elif ev.kind is EventKind.TOOL_CALL_BEGIN and ev.tool_call is not None:
            fn = {"name": ev.tool_call.name, "arguments": ""}
            out.append(
                {
                    "tool_calls": [
                        {"index": ev.tool_index, "id": ev.tool_call.id, "type": "function", "function": fn}
                    ]
                }
            )
        elif ev.kind is EventKind.TOOL_CALL_ARGUMENTS:
            last = out[-1]["tool_calls"][0] if out and "tool_calls" in out[-1] else None
            if last is not None and last["index"] == ev.tool_index:
                last["function"]["arguments"] += ev.text
            else:
                out.append({"tool_calls": [{"index": ev.tool_index, "function": {"arguments": ev.text}}]})
    return out


class _Choice:
    """Output state of one choice."""

    def __init__(self, text: OutputText, parser: OutputParser | ReasoningParser) -> None:
        self.text, self.parser = text, parser
        self.parsed: list[DeltaEvent] = []
        self.ids: list[int] = []
        self.lps: list[Any] = []
        self.reason: str | None = None
        self.n_prompt = self.n_cached = 0
        self.served_by: str | None = None
        self.made_calls = False

    def add(self, ev: TokenEvent) -> list[DeltaEvent]:
        """Take one event; the parser events it made final."""
        done = ev.finish_reason is not None
        self.ids += ev.token_ids
        self.lps += ev.logprobs or []
        self.n_prompt, self.n_cached = ev.num_prompt_tokens, ev.num_cached_tokens
        self.served_by = ev.served_by or self.served_by
        self.reason = ev.finish_reason if done else self.reason
        pieces = self.parser.feed(self.text.add(ev.token_ids, done)) + (self.parser.finish() if done else [])
        self.parsed += pieces
        return pieces


def _usage(choices: list[_Choice]) -> dict[str, Any]:
    """The prompt counted once, the completions of every choice."""
    return usage(choices[0].n_prompt, sum(len(c.ids) for c in choices), choices[0].n_cached)


async def _stream(
    state: AppState,
    head: dict[str, Any],
    streams: list[AsyncGenerator[TokenEvent, None]],
    choices: list[_Choice],
    tracker: RequestTracker,
    include_usage: bool,
    on_finish: TurnRecorder | None = None,
) -> AsyncIterator[str]:
    tok = state.backend.tokenizer
    base = {**head, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        obj: dict[str, Any] = {
            **base,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }
        if include_usage:
            obj["usage"] = None
        return sse(obj)

    status = CLIENT_CLOSED
    try:
        async with aclosing(merged(streams)) as evs:
            for i in range(len(choices)):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for i, ev in evs:
                c = choices[i]
                deltas = _deltas(c.add(ev))
                c.made_calls = c.made_calls or any("tool_calls" in d for d in deltas)
                lp = chat_logprobs(tok, ev.logprobs) if ev.logprobs else None
                for k, delta in enumerate(deltas or ([{}] if lp else [])):
                    yield chunk(i, _with_reasoning_alias(delta), logprobs=lp if k == 0 else None)
                if ev.finish_reason is not None:
                    yield chunk(i, {}, finish_reason(c.reason, c.made_calls))
            first = choices[0]
            if on_finish is not None and first.reason in ("stop", "length"):
                await on_finish(reply_message(collect(first.parsed)), first.served_by)
            if include_usage:
                yield sse({**base, "choices": [], "usage": _usage(choices)})
            status = 200
    except BackendError as e:
        err = from_backend_error(e)
        status = err.status
        yield sse(err.body())
    finally:
        tracker.finish(status, choices[0].reason)
    yield DONE


async def _collect(
    state: AppState,
    head: dict[str, Any],
    streams: list[AsyncGenerator[TokenEvent, None]],
    choices: list[_Choice],
    tracker: RequestTracker,
    return_token_ids: bool,
    on_finish: TurnRecorder | None = None,
) -> dict[str, Any]:
    tok = state.backend.tokenizer
    try:
        async with aclosing(merged(streams)) as evs:
            async for i, ev in evs:
                choices[i].add(ev)
    except BackendError as e:
        err = from_backend_error(e)
        tracker.finish(err.status, None)
        raise err from e
    out = []
    for i, c in enumerate(choices):
        message = reply_message(collect(c.parsed))
        calls = message.get("tool_calls", [])
        if i == 0 and on_finish is not None and c.reason in ("stop", "length"):
            await on_finish({k: v for k, v in message.items() if v is not None}, c.served_by)
        choice: dict[str, Any] = {
            "index": i,
            "message": _with_reasoning_alias(message),
            "logprobs": chat_logprobs(tok, c.lps) if c.lps else None,
            "finish_reason": finish_reason(c.reason, bool(calls)),
        }
        if return_token_ids:
            choice["token_ids"] = c.ids
        out.append(choice)
    tracker.finish(200, choices[0].reason)
    return {**head, "object": "chat.completion", "choices": out, "usage": _usage(choices)}
