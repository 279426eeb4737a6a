"""Agent sessions over HTTP: `/v1/sessions` CRUD, and what a chat turn with `session_id` does.

POST /v1/sessions {model?, ttl_seconds?, messages?, metadata?} creates one; GET /v1/sessions/{id};
POST /v1/sessions/{id}/messages {messages, tool_steps?} appends; GET /v1/sessions/{id}/messages lists the
history's messages ({"object": "list", "data": [...]}, oldest first: what an agent resumes from);
DELETE /v1/sessions/{id}. A session is visible only to the API key that created it: any other key gets
404, as for an unknown id. Bad ids are 400, limits 413, an unreachable store 503, all in OpenAI's error
shape.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from k2serve.api.errors import APIError
from k2serve.engine.protocol import SessionHint
from k2serve.sessions.errors import (
    InvalidSessionArgument,
    InvalidSessionId,
    SessionError,
    SessionLimitError,
    SessionNotFound,
    SessionStoreUnavailable,
)
from k2serve.sessions.session import Session


def session_error(e: SessionError) -> APIError:
    if isinstance(e, SessionNotFound):
        return APIError(
            404,
            f"session {e.session_id!r} does not exist",
            "invalid_request_error",
            "session_id",
            "session_not_found",
        )
    if isinstance(e, InvalidSessionId):
        return APIError(400, str(e), "invalid_request_error", "session_id", "invalid_session_id")
    if isinstance(e, SessionLimitError):
        return APIError(413, str(e), "invalid_request_error", "messages", "session_limit")
    if isinstance(e, InvalidSessionArgument):
        return APIError(400, str(e), "invalid_request_error", e.name, "invalid_value")
    if isinstance(e, SessionStoreUnavailable):
        return APIError(
            503, "the session store is unavailable; retry later", "service_unavailable", None, None
        )
    return APIError(400, str(e), "invalid_request_error", None, None)


def session_json(s: Session, block_size: int = 16) -> dict[str, Any]:
    """A session as the API shows it; `kv_blocks` is the KV memory its cached prefix holds on its worker."""
    cached = s.holder.cached_tokens if s.holder else 0
    return {
        "kv_blocks": -(-cached // block_size),
        "id": s.id,
        "object": "session",
        "model": s.model,
        "metadata": dict(s.metadata),
        "turn_count": s.turn_count,
        "tool_step_count": s.tool_step_count,
        "num_tokens": s.num_tokens,
        "num_messages": s.num_messages,
        "created_at_ms": s.created_ms,
        "last_used_ms": s.last_used_ms,
        "ttl_seconds": s.ttl_s,
        "holder": None
        if s.holder is None
        else {"worker_id": s.holder.worker_id, "cached_tokens": s.holder.cached_tokens},
    }


async def session_context(
    sessions: Any, session_id: str, owner: str
) -> tuple[list[dict[str, Any]], SessionHint]:
    try:
        return await sessions.context(session_id, owner)
    except SessionError as e:
        raise session_error(e) from e


class _Create(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    ttl_seconds: int | None = None
    messages: list[dict[str, Any]] = Field(default_factory=list)
    metadata: dict[str, str] | None = None


class _Append(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[dict[str, Any]] = Field(min_length=1)
    tool_steps: int = 0


def install_session_routes(app: FastAPI, state: Any, auth: list[Any]) -> None:
    sessions = state.sessions
    bs = sessions.store.config.block_size

    async def run(coro: Awaitable[Any]) -> Any:
        try:
            return await coro
        except SessionError as e:
            raise session_error(e) from e

    @app.post("/v1/sessions", dependencies=auth)
    async def _create(body: _Create, request: Request) -> JSONResponse:
        model = state.check_model(body.model)
        s = await run(
            sessions.create(state.owner(request), model, body.ttl_seconds, body.messages, body.metadata)
        )
        return JSONResponse(session_json(s, bs))

    @app.get("/v1/sessions/{session_id}", dependencies=auth)
    async def _get(session_id: str, request: Request) -> JSONResponse:
        return JSONResponse(session_json(await run(sessions.get(session_id, state.owner(request))), bs))

    @app.post("/v1/sessions/{session_id}/messages", dependencies=auth)
    async def _append(session_id: str, body: _Append, request: Request) -> JSONResponse:
        s = await run(
            sessions.append_messages(session_id, state.owner(request), body.messages, body.tool_steps)
        )
        return JSONResponse(session_json(s, bs))

    @app.get("/v1/sessions/{session_id}/messages", dependencies=auth)
    async def _messages(session_id: str, request: Request) -> JSONResponse:
        messages = await run(sessions.messages(session_id, state.owner(request)))
        return JSONResponse({"object": "list", "session_id": session_id, "data": messages})

    @app.delete("/v1/sessions/{session_id}", dependencies=auth)
    async def _delete(session_id: str, request: Request) -> JSONResponse:
        if not await run(sessions.delete(session_id, state.owner(request))):
            raise session_error(SessionNotFound(session_id))
        return JSONResponse({"id": session_id, "object": "session.deleted", "deleted": True})
