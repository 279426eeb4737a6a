"""Agent-loop SDK: tools as typed Python functions, a loop that runs them against a k2serve session.

`AgentLoop` keeps its state in the server's session (so `AgentLoop.resume` continues a dead client's
run); `HTTPTransport` / `GRPCTransport` carry its turns; `ToolRegistry` derives tool schemas from type hints.
"""

from k2serve.agent.errors import AgentError, ResumeError, ToolDefinitionError, TransportError
from k2serve.agent.grpc_transport import GRPCTransport
from k2serve.agent.http_transport import HTTPTransport
from k2serve.agent.loop import AgentLoop, AgentResult, StepRecord, ToolCallRecord
from k2serve.agent.tools import Tool, ToolOutcome, ToolRegistry
from k2serve.agent.transport import SamplingOptions, Transport, Turn

__all__ = [
    "AgentError",
    "AgentLoop",
    "AgentResult",
    "GRPCTransport",
    "HTTPTransport",
    "ResumeError",
    "SamplingOptions",
    "StepRecord",
    "Tool",
    "ToolCallRecord",
    "ToolDefinitionError",
    "ToolOutcome",
    "ToolRegistry",
    "Transport",
    "TransportError",
    "Turn",
]
