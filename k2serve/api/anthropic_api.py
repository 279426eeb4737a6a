"""Anthropic's Messages API: POST /v1/messages (plain and streamed) and POST /v1/messages/count_tokens.

The request is converted (`anthropic_convert`) into the one chat request every front door shares
(`k2serve.chat.request`), so prompts, tools, tool_choice grammars and output parsing are those of
/v1/chat/completions; the answer is shaped by `anthropic_stream`. The key, when the server has one,
comes as `x-api-key: <key>` (Anthropic's clients) or `Authorization: Bearer <key>`; `anthropic-version`
and `anthropic-beta` are accepted whatever their value. Every error, validation included, is in
Anthropic's shape (`anthropic_errors`). An assistant message last (Anthropic's "prefill") is refused:
the K2 prompt always opens a new assistant turn.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from k2serve.api.anthropic_convert import (
    CountTokensRequest,
    MessagesRequest,
    chat_inputs,
    parse,
    sampling_fields,
)
from k2serve.api.anthropic_errors import AnthropicError, from_api_error, invalid
from k2serve.api.anthropic_stream import BlockStream, Sign, content_blocks, event, stop_reason, usage
from k2serve.api.errors import APIError, from_backend_error
from k2serve.api.metrics import RequestTracker
from k2serve.api.params import sampling_params
from k2serve.api.runner import CLIENT_CLOSED, AppState, SSEResponse, events, start, unless_disconnected
from k2serve.chat.detok import OutputText
from k2serve.chat.parsers import DeltaEvent, OutputParser, ReasoningParser, collect
from k2serve.chat.request import ChatPlan, ChatRequestError, plan_chat
from k2serve.engine.protocol import BackendError, GenerateRequest, TokenEvent

ENDPOINT = "messages"
PARAM_NAMES = {"prompt_token_ids": "messages", "max_tokens": "max_tokens", "stop": "stop_sequences"}


def install_anthropic_routes(app: FastAPI, state: AppState, keys: Sequence[bytes]) -> None:
    """Mount the Messages routes on `app`; `keys`: the accepted API keys (none: open)."""

    async def _anthropic_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, AnthropicError)
        return exc.response()

    app.add_exception_handler(AnthropicError, _anthropic_error)

    def authorize(request: Request) -> None:
        if not keys:
            return
        presented = request.headers.get("x-api-key")
        if presented is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            presented = token if scheme.lower() == "bearer" else ""
        matches = [hmac.compare_digest(presented.strip().encode(), k) for k in keys]  # constant time
        if not any(matches):
            raise AnthropicError(
                401, "invalid x-api-key: send 'x-api-key: <key>' or 'Authorization: Bearer <key>'"
            )

    @app.post("/v1/messages")
    async def _messages(request: Request) -> Response:
        authorize(request)
        tracker = state.metrics.tracker(ENDPOINT)
        try:
            return await messages(state, await _json(request), request, tracker)
        except APIError as e:
            tracker.finish(e.status, None)
            raise from_api_error(e) from e
        except AnthropicError as e:
            tracker.finish(e.status, None)
            raise

    @app.post("/v1/messages/count_tokens")
    async def _count_tokens(request: Request) -> Response:
        authorize(request)
        req = parse(await _json(request), CountTokensRequest)
        try:
            state.check_model(req.model)
        except APIError as e:
            raise from_api_error(e) from e
        _, prompt = await _plan(state, req)
        return JSONResponse({"input_tokens": len(prompt)})


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as e:
        raise invalid(f"the request body is not valid JSON: {e}") from e


async def _plan(state: AppState, req: CountTokensRequest) -> tuple[ChatPlan, list[int]]:
    """The checked chat plan of `req` and its prompt ids (what count_tokens counts)."""
    last = req.messages[-1]
    if last.role != "user":
        raise invalid(
            f"messages.{len(req.messages) - 1}.role: the last message must be a user message "
            "(continuing an assistant message, 'prefill', is not supported)"
        )
    inputs = chat_inputs(req, state.thinking_signer.verify)
    try:
        plan = plan_chat(
            inputs.messages, inputs.tools, inputs.tool_choice, parallel_tool_calls=inputs.parallel_tool_calls
        )
        return plan, await asyncio.to_thread(plan.prompt, state.encoder)
    except ChatRequestError as e:
        raise invalid(str(e) if e.param in str(e) else f"{e.param}: {e}") from e


async def messages(state: AppState, raw: Any, http: Request, tracker: RequestTracker) -> Response:
    req: MessagesRequest = parse(raw, MessagesRequest)
    model = state.check_model(req.model)
    state.admit()
    backend = state.backend
    plan, prompt = await _plan(state, req)
    params = sampling_params(
        sampling_fields(req, model),
        prompt_len=len(prompt),
        prompt_param="messages",
        max_model_len=backend.max_model_len,
        max_tokens=req.max_tokens,
        max_tokens_param="max_tokens",
        logprobs=None,
        logprobs_param="logprobs",
    )
    rid = f"msg_{uuid.uuid4().hex}"
    stream = await start(state, GenerateRequest(rid, prompt, params, plan.structured, None), PARAM_NAMES)
    text = plan.output_text(
        backend.tokenizer, stop=params.stop, stop_token_ids=params.stop_token_ids, skip_special_tokens=True
    )
    evs = events(state, rid, stream, tracker)
    head = {"id": rid, "type": "message", "role": "assistant", "model": model}
    headers = {"request-id": rid}
    if req.stream:
        stream_events = _stream(
            head, len(prompt), evs, text, plan.parser(), tracker, state.thinking_signer.sign
        )
        response = SSEResponse(stream_events)
        response.headers.update(headers)
        return response
    collected = _collect(head, evs, text, plan.parser(), tracker, state.thinking_signer.sign)
    ok, result = await unless_disconnected(http, collected)
    if not ok:
        tracker.finish(CLIENT_CLOSED, None)
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(result, headers=headers)


async def _collect(
    head: dict[str, Any],
    evs: AsyncGenerator[TokenEvent, None],
    text: OutputText,
    parser: OutputParser | ReasoningParser,
    tracker: RequestTracker,
    sign: Sign,
) -> dict[str, Any]:
    parsed: list[DeltaEvent] = []
    reason, n_out, n_prompt, n_cached = None, 0, 0, 0
    try:
        async with aclosing(evs):
            async for ev in evs:
                done = ev.finish_reason is not None
                n_out += len(ev.token_ids)
                n_prompt, n_cached, reason = ev.num_prompt_tokens, ev.num_cached_tokens, ev.finish_reason
                parsed += parser.feed(text.add(ev.token_ids, done)) + (parser.finish() if done else [])
    except BackendError as e:
        raise from_backend_error(e) from e
    out = collect(parsed)
    tracker.finish(200, reason)
    return {
        **head,
        "content": content_blocks(out, sign),
        "stop_reason": stop_reason(reason, bool(out.tool_calls), text.stopped_by),
        "stop_sequence": text.stopped_by,
        "usage": usage(n_prompt, n_cached, n_out),
    }


async def _stream(
    head: dict[str, Any],
    prompt_len: int,
    evs: AsyncGenerator[TokenEvent, None],
    text: OutputText,
    parser: OutputParser | ReasoningParser,
    tracker: RequestTracker,
    sign: Sign,
) -> AsyncIterator[str]:
    """message_start carries the prompt length as input_tokens (the cache hit is not known yet);
    message_delta carries the final usage, which clients take over."""
    start_message = {**head, "content": [], "stop_reason": None, "stop_sequence": None}
    yield event("message_start", {"message": start_message | {"usage": usage(prompt_len, 0, 0)}})
    yield event("ping", {})
    blocks = BlockStream(sign)
    status, reason = CLIENT_CLOSED, None
    n_out = n_prompt = n_cached = 0
    try:
        async with aclosing(evs):
            async for ev in evs:
                done = ev.finish_reason is not None
                n_out += len(ev.token_ids)
                n_prompt, n_cached = ev.num_prompt_tokens, ev.num_cached_tokens
                pieces = parser.feed(text.add(ev.token_ids, done)) + (parser.finish() if done else [])
                for out in blocks.feed(pieces):
                    yield out
                reason = ev.finish_reason if done else reason
            for out in blocks.close():
                yield out
            delta = {
                "stop_reason": stop_reason(reason, blocks.made_calls, text.stopped_by),
                "stop_sequence": text.stopped_by,
            }
            yield event("message_delta", {"delta": delta, "usage": usage(n_prompt, n_cached, n_out)})
            yield event("message_stop", {})
            status = 200
    except BackendError as e:
        err = from_api_error(from_backend_error(e))
        status = err.status
        yield err.sse()
    finally:
        tracker.finish(status, reason)
