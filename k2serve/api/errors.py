"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status.

Every failure the API reports goes through `APIError`; `install_error_handlers` reshapes FastAPI's
own errors (pydantic validation: 400 instead of 422, unknown routes, wrong methods) the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2serve.engine.protocol import (
    BackendError,
    BackendFailure,
    DrainingError,
    InvalidRequestError,
    QueueFullError,
    UnavailableError,
)

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error response. `param` names the offending request field (dotted, `messages[0].role`)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def from_backend_error(e: BackendError, param_names: Mapping[str, str] | None = None) -> APIError:
    """The HTTP form of a backend error; `param_names` maps backend field names to request fields."""
    if isinstance(e, InvalidRequestError):
        param = (param_names or {}).get(e.param or "", e.param)
        code = (
            "context_length_exceeded"
            if e.limit is not None and e.param in ("prompt_token_ids", "max_tokens")
            else None
        )
        return bad_request(str(e), param, code)
    if isinstance(e, QueueFullError):
        retry = str(max(1, round(e.retry_after_s)))
        return APIError(429, str(e), "rate_limit_error", None, "queue_full", {"Retry-After": retry})
    if isinstance(e, DrainingError):
        return APIError(503, str(e), "service_unavailable", None, "draining", {"Retry-After": "5"})
    if isinstance(e, UnavailableError):
        retry = str(max(1, round(e.retry_after_s)))
        return APIError(503, str(e), "service_unavailable", None, "no_worker", {"Retry-After": retry})
    if isinstance(e, BackendFailure):
        return APIError(500, str(e), "internal_error", None, "backend_failure")
    return APIError(500, f"{type(e).__name__}: {e}", "internal_error", None, None)


def _loc_to_param(loc: tuple[int | str, ...]) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        param = _loc_to_param(tuple(first.get("loc", ())))
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        return bad_request(f"{param}: {first.get('msg', 'invalid value')}{more}", param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}
        return APIError(
            exc.status_code,
            str(exc.detail),
            kind.get(exc.status_code, "invalid_request_error"),
            headers=exc.headers,
        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in the API")
        return APIError(500, f"internal error: {type(exc).__name__}", "internal_error").response()
