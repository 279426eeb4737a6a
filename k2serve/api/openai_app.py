"""`build_app(backend, api_key)`: the OpenAI-compatible FastAPI application over any GenerationBackend.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, Anthropic's POST /v1/messages
and /v1/messages/count_tokens (k2serve.api.anthropic_api), OpenAI's /v1/responses
(k2serve.api.responses_api), vLLM's /tokenize and /detokenize (these need the API key when one is set:
`Authorization: Bearer <key>`, or `x-api-key` for Anthropic's), GET /health/live (200 while the process
serves), GET /health/ready and its alias GET /health (503 while draining or while the backend lacks
something to serve with, e.g. a cluster without workers) and GET /metrics (Prometheus text), which are
open. Errors use OpenAI's JSON error shape (see k2serve.api.errors), Anthropic's on its routes.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from k2serve.api.anthropic_api import install_anthropic_routes
from k2serve.api.chat import chat_completion
from k2serve.api.completions import completion
from k2serve.api.errors import APIError, install_error_handlers
from k2serve.api.metrics import CONTENT_TYPE, APIMetrics
from k2serve.api.responses_api import install_responses_routes
from k2serve.api.runner import AppState
from k2serve.api.schemas import ChatCompletionRequest, CompletionRequest
from k2serve.api.session_routes import install_session_routes
from k2serve.api.tokenize_routes import install_tokenize_routes
from k2serve.chat.prompt import PromptEncoder
from k2serve.engine.protocol import DrainingError, GenerationBackend, QueueFullError


def build_app(
    backend: GenerationBackend,
    api_key: str | None = None,
    sessions: Any = None,
    missing: Callable[[], list[str]] | None = None,
) -> FastAPI:
    """The app; `api_key` None or "" leaves the /v1 routes open; several keys may be given comma-separated
    (each client's key owns its sessions). `sessions` (a SessionService) enables /v1/sessions and chat
    `session_id`. `missing()` names what the backend lacks to serve (readiness: [] when ready; None:
    a local engine lacks nothing). `app.state.k2` is the AppState; `app.state.k2_auth` the API-key
    dependency, for routes the host adds."""
    state = AppState(
        backend, PromptEncoder(backend.tokenizer), APIMetrics(backend, sessions), api_key or None, sessions
    )
    keys = [k.strip().encode() for k in (api_key or "").split(",") if k.strip()]
    app = FastAPI(title="k2serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.k2 = state
    install_error_handlers(app)
    created = int(time.time())

    async def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        presented = token.strip().encode()
        matches = [hmac.compare_digest(presented, k) for k in keys]  # every key compared: constant time
        if scheme.lower() != "bearer" or not any(matches):
            raise APIError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                "invalid_request_error",
                None,
                "invalid_api_key",
                {"WWW-Authenticate": "Bearer"},
            )

    auth = [Depends(authorize)]
    app.state.k2_auth = auth  # for routes a host adds (the router's GET /cluster/workers)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def _chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat_completion(state, body, request)

    @app.post("/v1/completions", dependencies=auth)
    async def _completions(body: CompletionRequest, request: Request) -> Response:
        return await completion(state, body, request)

    @app.get("/v1/models", dependencies=auth)
    async def _models() -> JSONResponse:
        card = {
            "id": backend.model_name,
            "object": "model",
            "created": created,
            "owned_by": "k2serve",
            "max_model_len": backend.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    if sessions is not None:
        install_session_routes(app, state, auth)
    install_anthropic_routes(app, state, keys)
    install_responses_routes(app, state, auth)
    install_tokenize_routes(app, state, auth)

    @app.get("/health/live")
    async def _live() -> JSONResponse:
        return JSONResponse({"status": "live"})

    @app.get("/health")
    @app.get("/health/ready")
    async def _ready() -> JSONResponse:
        draining = False
        try:
            backend.check_admission()
        except DrainingError:
            draining = True
        except QueueFullError:
            pass  # a full queue is still a ready server
        lacking = ["draining: the server is shutting down"] if draining else []
        lacking += missing() if missing is not None else []
        if lacking:
            body = {"status": "unavailable", "ready": False, "missing": lacking}
            return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})
        return JSONResponse({"status": "ok", "ready": True})

    @app.get("/metrics")
    async def _metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return app
