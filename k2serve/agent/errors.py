"""Typed errors of the agent SDK; each carries the offending value.

Errors of a tool call (unknown tool, bad arguments, a tool that raised) are not exceptions: they go
back to the model as the tool's result (see `ToolRegistry.call`). What is raised is what the loop
cannot continue past: a tool that cannot be registered, a server that refused a request, a session
that has nothing to resume.
"""

from __future__ import annotations

__all__ = ["AgentError", "ResumeError", "ToolDefinitionError", "TransportError"]


class AgentError(Exception):
    """Base of every error the agent SDK raises on purpose."""


class ToolDefinitionError(AgentError, TypeError):
    """Function `name` cannot become a tool: `reason` names the parameter or annotation at fault."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"tool {name!r}: {reason}")


class TransportError(AgentError):
    """The server refused or failed `operation`. `status` is the HTTP status (or the gRPC status
    code's name), None when the server could not be reached; `detail` is the server's message."""

    def __init__(self, operation: str, status: int | str | None, detail: str) -> None:
        self.operation = operation
        self.status = status
        self.detail = detail
        super().__init__(f"{operation} failed ({status if status is not None else 'unreachable'}): {detail}")


class ResumeError(AgentError):
    """Session `session_id` cannot be resumed: `reason` says what its history ends with."""

    def __init__(self, session_id: str, reason: str) -> None:
        self.session_id = session_id
        self.reason = reason
        super().__init__(f"cannot resume session {session_id!r}: {reason}")
