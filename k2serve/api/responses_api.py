"""OpenAI's Responses API: POST /v1/responses (plain and streamed), GET and DELETE /v1/responses/{id}.

The request is converted (`responses_convert`) into the one chat request every front door shares
(`k2serve.chat.request`); the output is shaped by `responses_output`. Conversation state lives in the
session store (`k2serve.sessions`): a stored response (`store`, default true) without
`previous_response_id` keeps its conversation in its record; the first response that continues it
opens a session with that conversation, and later ones continue that session, so their turns are
routed to the worker that holds the conversation's KV cache and only the new input is computed
(`usage.input_tokens_details.cached_tokens` counts the rest). Continuing from an older response of a
chain (a branch) starts a new session with that response's conversation. So only continued chains
take sessions (a key may hold SessionStoreConfig.max_sessions_per_owner at once). Each response's
record (`k2serve.sessions.responses`) is visible only to the API key that made it: any other key gets
404, as for an unknown id. Without a Redis session store (`k2serve serve`), sessions and records live
in the server's memory. Errors are in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from k2serve.api.errors import APIError, bad_request, from_backend_error
from k2serve.api.metrics import RequestTracker
from k2serve.api.params import sampling_params
from k2serve.api.responses_convert import ResponsesRequest, chat_inputs, not_found, sampling_fields
from k2serve.api.responses_output import OutputItems, usage
from k2serve.api.runner import CLIENT_CLOSED, AppState, SSEResponse, events, start, unless_disconnected
from k2serve.api.session_routes import session_error
from k2serve.chat.detok import OutputText
from k2serve.chat.parsers import DeltaEvent, OutputParser, ReasoningParser, collect
from k2serve.chat.request import ChatRequestError, plan_chat, reply_message
from k2serve.engine.protocol import BackendError, GenerateRequest, SessionHint, TokenEvent
from k2serve.sessions.errors import SessionError, SessionNotFound
from k2serve.sessions.memory import InMemorySessionStore
from k2serve.sessions.responses import ResponseRecord
from k2serve.sessions.service import SessionService

ENDPOINT = "responses"
PARAM_NAMES = {"prompt_token_ids": "input", "max_tokens": "max_output_tokens"}
Finisher = Callable[[dict[str, Any], list[DeltaEvent], str | None], Awaitable[None]]


def install_responses_routes(app: FastAPI, state: AppState, auth: list[Any]) -> None:
    sessions: SessionService = state.sessions or SessionService(InMemorySessionStore())

    @app.post("/v1/responses", dependencies=auth)
    async def _create(body: ResponsesRequest, request: Request) -> Response:
        tracker = state.metrics.tracker(ENDPOINT)
        try:
            return await create_response(state, sessions, body, request, tracker)
        except APIError as e:
            tracker.finish(e.status, None)
            raise

    @app.get("/v1/responses/{response_id}", dependencies=auth)
    async def _get(response_id: str, request: Request) -> JSONResponse:
        record = await asyncio.to_thread(sessions.responses.get, response_id, state.owner(request))
        if record is None:
            raise not_found(response_id, None)
        return JSONResponse(record.response)

    @app.delete("/v1/responses/{response_id}", dependencies=auth)
    async def _delete(response_id: str, request: Request) -> JSONResponse:
        if not await asyncio.to_thread(sessions.responses.delete, response_id, state.owner(request)):
            raise not_found(response_id, None)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})


async def _conversation(
    sessions: SessionService, body: ResponsesRequest, owner: str, model: str
) -> tuple[list[dict[str, Any]], str | None, SessionHint | None]:
    """(the history this request continues, the session its turn is recorded in (None: the first
    response of a chain, or not stored), the routing hint)."""
    if body.previous_response_id is None:
        return [], None, None
    try:
        previous = await asyncio.to_thread(sessions.responses.get, body.previous_response_id, owner)
        if previous is None:
            raise not_found(body.previous_response_id, "previous_response_id")
        if previous.session_id is None:  # the chain's second response: its session starts now
            history = list(previous.messages or [])[: previous.num_messages]
        else:
            try:
                history, hint = await sessions.context(previous.session_id, owner)
            except SessionNotFound as e:
                raise not_found(body.previous_response_id, "previous_response_id") from e
            if len(history) == previous.num_messages:
                return history, previous.session_id if body.store else None, hint
            history = history[: previous.num_messages]  # a branch: a new session from that point
        if not body.store:
            return history, None, None
        s = await sessions.create(owner, model, None, history)
        return history, s.id, SessionHint(s.id, None, 0)
    except SessionError as e:
        raise session_error(e) from e


async def create_response(
    state: AppState, sessions: SessionService, body: ResponsesRequest, http: Request, tracker: RequestTracker
) -> Response:
    model = state.check_model(body.model)
    state.admit()
    owner = state.owner(http)
    inputs = chat_inputs(body)
    history, session_id, hint = await _conversation(sessions, body, owner, model)
    lead = [inputs.instructions] if inputs.instructions is not None else []
    try:
        plan = plan_chat(
            [*lead, *history, *inputs.messages],
            inputs.tools,
            inputs.tool_choice,
            inputs.response_format,
            parallel_tool_calls=body.parallel_tool_calls is not False,
        )
        prompt = await asyncio.to_thread(plan.prompt, state.encoder)
    except ChatRequestError as e:
        raise bad_request(str(e), "input" if e.param == "messages" else e.param) from e
    params = sampling_params(
        sampling_fields(body, model),
        prompt_len=len(prompt),
        prompt_param="input",
        max_model_len=state.backend.max_model_len,
        max_tokens=body.max_output_tokens,
        max_tokens_param="max_output_tokens",
        logprobs=None,
        logprobs_param="logprobs",
    )
    rid = f"resp_{uuid.uuid4().hex}"
    stream = await start(state, GenerateRequest(rid, prompt, params, plan.structured, hint), PARAM_NAMES)
    text = plan.output_text(state.backend.tokenizer, stop=params.stop, skip_special_tokens=True)
    evs = events(state, rid, stream, tracker)
    head = _head(rid, model, body)

    async def finish(response: dict[str, Any], parsed: list[DeltaEvent], served_by: str | None) -> None:
        """Record a finished turn in its session (or, for a chain's first response, in its record),
        then the response."""
        if not body.store:
            return
        reply = reply_message(collect(parsed))
        num_messages = len(history) + len(inputs.messages) + 1
        if session_id is None:
            own = [*inputs.messages, {k: v for k, v in reply.items() if v is not None}]
            record = ResponseRecord(None, num_messages, response, own)
        else:
            await sessions.turn_recorder(session_id, owner, inputs.messages, prompt)(reply, served_by)
            record = ResponseRecord(session_id, num_messages, response)
        await asyncio.to_thread(sessions.responses.put, rid, owner, record)

    if body.stream:
        return SSEResponse(_stream(head, evs, text, plan.parser(), tracker, finish))
    ok, result = await unless_disconnected(http, _collect(head, evs, text, plan.parser(), tracker, finish))
    if not ok:
        tracker.finish(CLIENT_CLOSED, None)
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(result)


def _head(rid: str, model: str, body: ResponsesRequest) -> dict[str, Any]:
    """The response object's fields that echo the request."""
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "instructions": body.instructions,
        "previous_response_id": body.previous_response_id,
        "tools": body.tools or [],
        "tool_choice": body.tool_choice or "auto",
        "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "store": body.store,
        "metadata": body.metadata or {},
        "text": body.text or {"format": {"type": "text"}},
        "error": None,
    }


def _final(
    head: dict[str, Any], items: OutputItems, reason: str | None, use: dict[str, Any]
) -> dict[str, Any]:
    incomplete = reason == "length"
    return {
        **head,
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "output": items.items,
        "usage": use,
    }


async def _collect(
    head: dict[str, Any],
    evs: AsyncGenerator[TokenEvent, None],
    text: OutputText,
    parser: OutputParser | ReasoningParser,
    tracker: RequestTracker,
    finish: Finisher,
) -> dict[str, Any]:
    items = OutputItems()
    parsed: list[DeltaEvent] = []
    reason, n_out, n_prompt, n_cached, served_by = None, 0, 0, 0, None
    try:
        async with aclosing(evs):
            async for ev in evs:
                done = ev.finish_reason is not None
                n_out += len(ev.token_ids)
                n_prompt, n_cached, reason = ev.num_prompt_tokens, ev.num_cached_tokens, ev.finish_reason
                served_by = ev.served_by or served_by
                pieces = parser.feed(text.add(ev.token_ids, done)) + (parser.finish() if done else [])
                parsed += pieces
                for _ in items.feed(pieces):
                    pass
    except BackendError as e:
        raise from_backend_error(e) from e
    for _ in items.close():
        pass
    response = _final(head, items, reason, usage(n_prompt, n_cached, n_out))
    if reason in ("stop", "length"):
        await finish(response, parsed, served_by)
    tracker.finish(200, reason)
    return response


async def _stream(
    head: dict[str, Any],
    evs: AsyncGenerator[TokenEvent, None],
    text: OutputText,
    parser: OutputParser | ReasoningParser,
    tracker: RequestTracker,
    finish: Finisher,
) -> AsyncIterator[str]:
    items = OutputItems()
    pending = {**head, "status": "in_progress", "incomplete_details": None, "output": [], "usage": None}
    yield items.event("response.created", response=pending)
    yield items.event("response.in_progress", response=pending)
    parsed: list[DeltaEvent] = []
    status, reason, n_out, n_prompt, n_cached, served_by = CLIENT_CLOSED, None, 0, 0, 0, None
    try:
        async with aclosing(evs):
            async for ev in evs:
                done = ev.finish_reason is not None
                n_out += len(ev.token_ids)
                n_prompt, n_cached = ev.num_prompt_tokens, ev.num_cached_tokens
                served_by = ev.served_by or served_by
                pieces = parser.feed(text.add(ev.token_ids, done)) + (parser.finish() if done else [])
                parsed += pieces
                for out in items.feed(pieces):
                    yield out
                reason = ev.finish_reason if done else reason
        for out in items.close():
            yield out
        response = _final(head, items, reason, usage(n_prompt, n_cached, n_out))
        if reason in ("stop", "length"):
            await finish(response, parsed, served_by)
        yield items.event(f"response.{response['status']}", response=response)
        status = 200
    except BackendError as e:
        err = from_backend_error(e)
        status = err.status
        failed = {
            **pending,
            "status": "failed",
            "error": {"code": err.code or err.type, "message": err.message},
        }
        yield items.event("response.failed", response=failed)
    finally:
        tracker.finish(status, reason)
