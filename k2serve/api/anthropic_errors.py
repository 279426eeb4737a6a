"""Anthropic-style errors: `{"type": "error", "error": {"type", "message"}}` with Anthropic's status codes.

The Messages routes report every failure this way, also the ones the shared plumbing raises as
OpenAI-shaped `APIError`s (`from_api_error`) and pydantic's validation errors (`from_validation`).
Types by status, as Anthropic documents them: 400 invalid_request_error, 401 authentication_error,
403 permission_error, 404 not_found_error, 413 request_too_large, 429 rate_limit_error, 500 api_error,
503/529 overloaded_error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from k2serve.api.errors import APIError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class AnthropicError(Exception):
    """An error response in Anthropic's shape; the type follows from the status (ERROR_TYPES)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.type, "message": self.message}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        """The error as a stream event (a failure after the stream has started)."""
        return f"event: error\ndata: {json.dumps(self.body())}\n\n"


def invalid(message: str) -> AnthropicError:
    return AnthropicError(400, message)


def from_api_error(e: APIError) -> AnthropicError:
    """The Anthropic form of an error the shared plumbing raised; the field it names leads the message."""
    message = e.message
    if e.param and e.param not in message:
        message = f"{e.param}: {message}"
    return AnthropicError(e.status, message, e.headers)


def _path(loc: tuple[int | str, ...]) -> str:
    """("messages", 0, "role") -> "messages.0.role" (Anthropic's way to name a field)."""
    return ".".join(str(part) for part in loc) or "body"


def from_validation(e: ValidationError) -> AnthropicError:
    errors = e.errors()
    first = errors[0]
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return invalid(f"{_path(tuple(first['loc']))}: {first['msg']}{more}")
