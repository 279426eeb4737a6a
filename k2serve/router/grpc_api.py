"""The public gRPC API (`k2serve.v1.K2Serve`) over any GenerationBackend: Generate, Chat, ListModels.

Same semantics as the OpenAI-compatible HTTP API: bad input is INVALID_ARGUMENT naming the field,
a full queue RESOURCE_EXHAUSTED, draining UNAVAILABLE; a cancelled call aborts its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc
from typing_extensions import override

from k2serve.chat.detok import OutputText
from k2serve.chat.parsers import DeltaEvent, EventKind, collect
from k2serve.chat.prompt import PromptEncoder
from k2serve.chat.request import ChatPlan, ChatRequestError, finish_reason, plan_chat, reply_message
from k2serve.engine.protocol import BackendError, GenerateRequest, GenerationBackend, TokenEvent
from k2serve.engine.sampling_params import SamplingParams, SamplingParamsError
from k2serve.proto import api_pb2, api_pb2_grpc, common_pb2
from k2serve.proto.messages import chat_message_from_proto, chat_message_to_proto, finish_to_proto
from k2serve.rpc.convert import logprob_to_proto, sampling_from_proto
from k2serve.rpc.status import status_of
from k2serve.sessions.errors import (
    InvalidSessionArgument,
    InvalidSessionId,
    SessionError,
    SessionLimitError,
    SessionNotFound,
)
from k2serve.sessions.service import SessionService
from k2serve.sessions.session import Session

logger = logging.getLogger(__name__)
T = TypeVar("T")


class K2ServeServicer(api_pb2_grpc.K2ServeServicer):
    def __init__(self, backend: GenerationBackend, sessions: SessionService | None = None) -> None:
        self.backend = backend
        self.encoder = PromptEncoder(backend.tokenizer)
        self.sessions = sessions  # None: sessions are not enabled
        self.created = int(time.time())

    async def _params(
        self, m: common_pb2.SamplingParams, prompt_len: int, context: grpc.aio.ServicerContext
    ) -> SamplingParams:
        default = max(1, self.backend.max_model_len - prompt_len)
        try:
            return sampling_from_proto(m, default_max_tokens=default)
        except SamplingParamsError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{e}")

    async def _events(
        self, req: GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[TokenEvent, None]:
        try:
            self.backend.check_admission()
            stream = await self.backend.generate(req)
        except BackendError as e:
            await context.abort(status_of(e), str(e))
        finished = False
        try:
            async for ev in stream:
                finished = ev.finish_reason is not None
                yield ev
        except BackendError as e:
            finished = True
            await context.abort(status_of(e), str(e))
        finally:
            if not finished:
                await self.backend.abort(req.request_id)

    @override
    async def Generate(
        self, request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.GenerateResponse]:
        tok = self.backend.tokenizer
        if request.model and request.model != self.backend.model_name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not served here")
        which = request.WhichOneof("prompt")
        if which == "text":
            prompt = tok.encode(request.text)
        elif which == "token_ids":
            prompt = list(request.token_ids.ids)
        else:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: give text or token_ids")
        if not prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")
        params = await self._params(request.sampling, len(prompt), context)
        rid = request.request_id or f"gen-{uuid.uuid4().hex}"
        text = OutputText(tok, skip_special_tokens=True, final_stop_ids=tok.stop_ids, stop=params.stop)
        produced = 0
        async with contextlib.aclosing(self._events(GenerateRequest(rid, prompt, params), context)) as evs:
            async for ev in evs:
                produced += len(ev.token_ids)
                done = ev.finish_reason is not None
                out = api_pb2.GenerateResponse(
                    request_id=rid,
                    token_ids=ev.token_ids,
                    text=text.add(ev.token_ids, done),
                    finish_reason=finish_to_proto(ev.finish_reason),
                    logprobs=[logprob_to_proto(lp) for lp in ev.logprobs or []],
                )
                if done:
                    out.usage.CopyFrom(_usage(prompt, produced, ev))
                yield out

    @override
    async def Chat(
        self, request: api_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.ChatResponse]:
        """The chat path HTTP's /v1/chat/completions takes (`k2serve.chat.request`), with the same rules
        and errors: a bad request is INVALID_ARGUMENT naming the field, a renderer failure that is not
        the messages' fault INTERNAL (HTTP's 500)."""
        tok = self.backend.tokenizer
        if request.model and request.model != self.backend.model_name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not served here")
        try:
            plan = plan_chat(
                [chat_message_from_proto(m) for m in request.messages],
                [_tool(t) for t in request.tools] or None,
                _tool_choice(request.tool_choice),
                _response_format(request.response_format),
                parallel_tool_calls=not request.HasField("parallel_tool_calls")
                or request.parallel_tool_calls,
            )
        except (ChatRequestError, _ProtoFieldError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        history: list[dict[str, Any]] = []
        hint, record = None, None
        if request.HasField("session_id"):  # as over HTTP: history from the store, then the new messages
            owner = self._owner(context)
            sessions = await self._store(context)
            history, hint = await self._sessions_call(context, sessions.context(request.session_id, owner))
        prompt, error = await _render(plan, self.encoder, history)
        if error is not None:
            await context.abort(*error)
        if hint is not None:
            record = sessions.turn_recorder(hint.session_id, owner, plan.messages, prompt)
        params = await self._params(request.sampling, len(prompt), context)
        rid = request.request_id or f"chat-{uuid.uuid4().hex}"
        text = plan.output_text(
            tok,
            stop=params.stop,
            stop_token_ids=params.stop_token_ids,
            skip_special_tokens=params.skip_special_tokens,
        )
        parser = plan.parser()
        produced, made_calls, first = 0, False, True
        parsed_all: list[DeltaEvent] = []
        async with contextlib.aclosing(
            self._events(GenerateRequest(rid, prompt, params, plan.structured, hint), context)
        ) as evs:
            async for ev in evs:
                produced += len(ev.token_ids)
                done = ev.finish_reason is not None
                delta = api_pb2.ChatDelta(role="assistant" if first else "")
                first = False
                pieces = parser.feed(text.add(ev.token_ids, done)) + (parser.finish() if done else [])
                parsed_all += pieces
                for p in pieces:
                    if p.kind == EventKind.REASONING:
                        delta.reasoning_content += p.text
                    elif p.kind == EventKind.CONTENT:
                        delta.content += p.text
                    elif p.tool_call is not None and p.kind == EventKind.TOOL_CALL_END:
                        made_calls = True
                        c = p.tool_call
                        delta.tool_calls.append(
                            api_pb2.ToolCall(
                                id=c.id,
                                type="function",
                                index=c.index,
                                function=api_pb2.FunctionCall(name=c.name, arguments=c.arguments),
                            )
                        )
                out = api_pb2.ChatResponse(
                    request_id=rid,
                    delta=delta,
                    finish_reason=finish_to_proto(finish_reason(ev.finish_reason, done and made_calls)),
                    logprobs=[logprob_to_proto(lp) for lp in ev.logprobs or []],
                )
                if done:
                    out.usage.CopyFrom(_usage(prompt, produced, ev))
                    if record is not None and ev.finish_reason in ("stop", "length"):
                        # recorded before the last chunk leaves, so the client's next turn sees it
                        await record(reply_message(collect(parsed_all)), ev.served_by)
                yield out

    # ---- sessions --------------------------------------------------------------------------------
    def _owner(self, context: grpc.aio.ServicerContext) -> str:
        md = dict(context.invocation_metadata() or ())
        scheme, _, token = str(md.get("authorization", "")).partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else "anonymous"

    async def _store(self, context: grpc.aio.ServicerContext) -> SessionService:
        """The session service; FAILED_PRECONDITION when sessions are not enabled."""
        if self.sessions is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "sessions are not enabled (no Redis URL)"
            )
        return self.sessions

    async def _sessions_call(self, context: grpc.aio.ServicerContext, call: Awaitable[T]) -> T:
        """`await call`, its SessionError as the matching status."""
        try:
            return await call
        except SessionError as e:
            await context.abort(_session_status(e), str(e))

    @override
    async def CreateSession(
        self, request: api_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.Session:
        if request.model and request.model != self.backend.model_name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not served here")
        sessions = await self._store(context)
        ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
        msgs = [chat_message_from_proto(m) for m in request.messages]
        owner = self._owner(context)
        s = await self._sessions_call(context, sessions.create(owner, self.backend.model_name, ttl, msgs))
        return _session_pb(s)

    @override
    async def GetSession(
        self, request: api_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.Session:
        sessions = await self._store(context)
        s = await self._sessions_call(context, sessions.get(request.session_id, self._owner(context)))
        return _session_pb(s)

    @override
    async def GetSessionMessages(
        self, request: api_pb2.GetSessionMessagesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.GetSessionMessagesResponse:
        """The history HTTP's GET /v1/sessions/{id}/messages returns, for the same owner only."""
        sessions = await self._store(context)
        call = sessions.messages(request.session_id, self._owner(context))
        messages = await self._sessions_call(context, call)
        return api_pb2.GetSessionMessagesResponse(
            session_id=request.session_id, messages=[chat_message_to_proto(m) for m in messages]
        )

    @override
    async def AppendSession(
        self, request: api_pb2.AppendSessionRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.Session:
        sessions = await self._store(context)
        msgs = [chat_message_from_proto(m) for m in request.messages]
        tool_steps = sum(1 for m in msgs if m["role"] == "tool")
        call = sessions.append_messages(request.session_id, self._owner(context), msgs, tool_steps)
        return _session_pb(await self._sessions_call(context, call))

    @override
    async def DeleteSession(
        self, request: api_pb2.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.DeleteSessionResponse:
        sessions = await self._store(context)
        ok = await self._sessions_call(context, sessions.delete(request.session_id, self._owner(context)))
        return api_pb2.DeleteSessionResponse(deleted=bool(ok))

    @override
    async def ListModels(
        self, request: api_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListModelsResponse:
        card = api_pb2.ModelCard(
            id=self.backend.model_name,
            owned_by="k2serve",
            created_unix_s=self.created,
            max_model_len=self.backend.max_model_len,
        )
        return api_pb2.ListModelsResponse(models=[card])


def _usage(prompt: list[int], produced: int, last: TokenEvent) -> common_pb2.Usage:
    """The Usage sent with a request's final chunk: its prompt, the `produced` tokens, and the prompt
    tokens served from cache (as the `last` event reports them)."""
    return common_pb2.Usage(
        prompt_tokens=len(prompt), completion_tokens=produced, cached_tokens=last.num_cached_tokens
    )


class _ProtoFieldError(ValueError):
    """A ChatRequest field that is not what its proto comment promises (e.g. JSON text that does not
    parse); the message names the field."""


def _tool(t: api_pb2.Tool) -> dict[str, Any]:
    try:
        parameters = json.loads(t.parameters) if t.parameters else {}
    except json.JSONDecodeError as e:
        raise _ProtoFieldError(f"tools[].parameters is not JSON: {e}") from e
    fn: dict[str, Any] = {"name": t.name, "description": t.description, "parameters": parameters}
    return {"type": t.type or "function", "function": fn}


def _tool_choice(m: api_pb2.ToolChoice) -> str | dict[str, Any] | None:
    """The OpenAI tool_choice a ToolChoice holds (None: unset)."""
    which = m.WhichOneof("choice")
    if which == "function_name":
        return {"type": "function", "function": {"name": m.function_name}}
    return (m.mode or None) if which == "mode" else None


def _response_format(m: api_pb2.ResponseFormat) -> dict[str, Any] | None:
    """The OpenAI response_format a ResponseFormat holds (None: unset); an empty json_schema is `{}`
    (any JSON value)."""
    if not m.type:
        return None
    if m.type != "json_schema":
        return {"type": m.type}
    try:
        schema = json.loads(m.json_schema or "{}")
    except json.JSONDecodeError as e:
        raise _ProtoFieldError(f"response_format.json_schema is not JSON: {e}") from e
    return {"type": "json_schema", "json_schema": {"name": m.name or "response", "schema": schema}}


async def _render(
    plan: ChatPlan, encoder: PromptEncoder, history: list[dict[str, Any]]
) -> tuple[list[int], tuple[grpc.StatusCode, str] | None]:
    """The prompt ids, or the status to abort with: INVALID_ARGUMENT for messages the template refuses,
    INTERNAL (logged) for any other failure of the renderer, as HTTP answers 400 and 500."""
    try:
        return await asyncio.to_thread(plan.prompt, encoder, history), None
    except ChatRequestError as e:
        return [], (grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except Exception as e:  # not the request's fault: the client gets INTERNAL, the log the traceback
        logger.exception("rendering a chat prompt failed")
        return [], (grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")


def _session_status(e: Exception) -> grpc.StatusCode:
    if isinstance(e, SessionNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, InvalidSessionId | InvalidSessionArgument):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(e, SessionLimitError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.UNAVAILABLE


def _session_pb(s: Session) -> api_pb2.Session:
    return api_pb2.Session(
        id=s.id,
        model=s.model,
        turn_count=s.turn_count,
        tool_step_count=s.tool_step_count,
        created_unix_ms=s.created_ms,
        last_used_unix_ms=s.last_used_ms,
        ttl_seconds=s.ttl_s,
        num_tokens=s.num_tokens,
    )
