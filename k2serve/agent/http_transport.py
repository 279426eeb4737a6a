"""HTTPTransport: the agent's turns over the OpenAI-compatible API, through the `openai` client.

A turn is `chat.completions.create(..., stream=True, extra_body={"session_id": ...})`; sessions use
the client's generic `post`/`get`/`delete` on `/v1/sessions`. Needs the `openai` package (a client
dependency, imported only here).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from k2serve.agent.errors import TransportError
from k2serve.agent.transport import Message, SamplingOptions, Transport, Turn, assistant_message
from k2serve.extras import MissingExtraError

if TYPE_CHECKING:
    import openai

__all__ = ["HTTPTransport"]


class HTTPTransport(Transport):
    """Over an `openai.OpenAI` client whose base_url is the router's `.../v1`.

    Give the client `max_retries=0` (as `connect` does): a retried turn could reach the server
    twice and be recorded twice."""

    def __init__(self, client: openai.OpenAI) -> None:
        self.client = client
        self._served_model: str | None = None

    @classmethod
    def connect(cls, base_url: str, api_key: str | None = None, timeout_s: float = 600.0) -> HTTPTransport:
        """A transport to the router at `base_url` (e.g. "http://127.0.0.1:8000", without /v1)."""
        try:
            import openai
        except ImportError as e:
            raise MissingExtraError("openai", "agent", "HTTPTransport") from e

        client = openai.OpenAI(  # no key: "anonymous", the owner a keyless server gives every session
            base_url=base_url.rstrip("/") + "/v1",
            api_key=api_key or "anonymous",
            timeout=timeout_s,
            max_retries=0,
        )
        return cls(client)

    # ---- errors ------------------------------------------------------------------------------------
    def _call(self, operation: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import openai

        try:
            return fn(*args, **kwargs)
        except openai.APIStatusError as e:
            raise TransportError(operation, e.status_code, e.message) from e
        except openai.APIError as e:  # connection errors, error events inside a stream
            raise TransportError(operation, None, e.message) from e

    def _model(self, model: str | None) -> str:
        if model is not None:
            return model
        if self._served_model is None:
            models = self._call("list models", self.client.models.list)
            self._served_model = models.data[0].id
        return self._served_model

    # ---- sessions ----------------------------------------------------------------------------------
    def create_session(self, messages: Sequence[Message], ttl_seconds: int | None, model: str | None) -> str:
        body: dict[str, Any] = {"messages": list(messages)}
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        if model is not None:
            body["model"] = model
        out = self._call("create session", self.client.post, "/sessions", body=body, cast_to=object)
        return str(out["id"])

    def session_messages(self, session_id: str) -> list[Message]:
        path = f"/sessions/{quote(session_id, safe='')}/messages"
        out = self._call(f"read session {session_id}", self.client.get, path, cast_to=object)
        return list(out["data"])

    def delete_session(self, session_id: str) -> bool:
        try:
            self._call(
                f"delete session {session_id}",
                self.client.delete,
                f"/sessions/{quote(session_id, safe='')}",
                cast_to=object,
            )
        except TransportError as e:
            if e.status == 404:
                return False
            raise
        return True

    # ---- one turn ----------------------------------------------------------------------------------
    def chat(
        self,
        session_id: str | None,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]],
        tool_choice: str,
        sampling: SamplingOptions,
        model: str | None,
    ) -> Turn:
        kwargs: dict[str, Any] = {
            "model": self._model(model),
            "messages": list(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if session_id is not None:
            kwargs["extra_body"] = {"session_id": session_id}
        if tools:
            kwargs |= {"tools": list(tools), "tool_choice": tool_choice}
        for name in ("temperature", "top_p", "max_tokens", "seed"):
            if (value := getattr(sampling, name)) is not None:
                kwargs[name] = value
        if sampling.stop:
            kwargs["stop"] = list(sampling.stop)
        if sampling.logprobs:
            kwargs["logprobs"] = True
        t0 = time.perf_counter()
        ttft, finish, usage = None, None, None
        content, reasoning = [], []
        calls: dict[int, dict[str, Any]] = {}

        def consume() -> None:
            nonlocal ttft, finish, usage
            with self.client.chat.completions.create(**kwargs) as stream:
                for chunk in stream:
                    usage = chunk.usage or usage
                    for choice in chunk.choices:
                        d = choice.delta
                        piece = getattr(d, "reasoning_content", None) or ""
                        lps = choice.logprobs.content if choice.logprobs is not None else None
                        if ttft is None and (d.content or piece or d.tool_calls or lps):
                            ttft = time.perf_counter() - t0
                        content.append(d.content or "")
                        reasoning.append(piece)
                        for tc in d.tool_calls or []:
                            call = calls.setdefault(
                                tc.index,
                                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                            )
                            call["id"] = tc.id or call["id"]
                            if tc.function is not None:
                                call["function"]["name"] += tc.function.name or ""
                                call["function"]["arguments"] += tc.function.arguments or ""
                        finish = choice.finish_reason or finish

        self._call(f"chat turn of session {session_id}", consume)
        latency = time.perf_counter() - t0
        if finish not in ("stop", "length", "tool_calls") or usage is None:
            raise TransportError(
                f"chat turn of session {session_id}", None, f"the stream ended with finish reason {finish!r}"
            )
        message = assistant_message("".join(content), "".join(reasoning), [calls[i] for i in sorted(calls)])
        if calls and finish == "length" and session_id is not None:
            message = self.session_messages(session_id)[-1]  # a call cut by max_tokens: the server's record
        details = usage.prompt_tokens_details
        return Turn(
            message=message,
            finish_reason=finish,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=(details.cached_tokens or 0) if details is not None else 0,
            completion_tokens=usage.completion_tokens,
            ttft_s=ttft if ttft is not None else latency,
            latency_s=latency,
        )
