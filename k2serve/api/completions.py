"""POST /v1/completions: raw prompts (text, token ids, or a list of either) -> text, one choice per prompt.

A text prompt here is the caller's whole prompt (there is no template to protect), so special-token
names in it are encoded as special tokens, as Hugging Face tokenizers do by default.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from k2serve.api.errors import APIError, bad_request, from_backend_error
from k2serve.api.metrics import RequestTracker
from k2serve.api.outputs import CompletionLogprobs, merge_completion_logprobs, usage
from k2serve.api.params import per_choice, sampling_params
from k2serve.api.runner import (
    CLIENT_CLOSED,
    DONE,
    AppState,
    SSEResponse,
    events,
    merged,
    sse,
    start,
    unless_disconnected,
)
from k2serve.api.schemas import CompletionRequest
from k2serve.chat.detok import OutputText
from k2serve.engine.protocol import BackendError, GenerateRequest, TokenEvent

ENDPOINT = "completions"
MAX_PROMPTS = 64


def _prompts(state: AppState, body: CompletionRequest) -> list[list[int]]:
    p = body.prompt
    single = isinstance(p, str) or (bool(p) and isinstance(p[0], int))
    items: list[str | list[int]] = [p] if single else list(p)  # type: ignore[list-item, arg-type]
    if not items:
        raise bad_request("prompt is empty", "prompt")
    if len(items) > MAX_PROMPTS:
        raise bad_request(f"prompt holds {len(items)} prompts; at most {MAX_PROMPTS} per request", "prompt")
    out = []
    for i, item in enumerate(items):
        ids = state.backend.tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise bad_request(f"prompt {i} is empty", "prompt")
        out.append(ids)
    return out


async def completion(state: AppState, body: CompletionRequest, http: Request) -> Response:
    tracker = state.metrics.tracker(ENDPOINT)
    started: list[str] = []
    try:
        return await _completion(state, body, http, tracker, started)
    except APIError as e:
        tracker.finish(e.status, None)
        for rid in started:  # prompts admitted before a later one was refused
            await state.backend.abort(rid)
        raise


class _Choice:
    """Output state of one prompt."""

    def __init__(
        self, state: AppState, params_stop: list[str], stop_ids: set[int], want_logprobs: bool
    ) -> None:
        tok = state.backend.tokenizer
        self.text = OutputText(tok, final_stop_ids=tok.stop_ids | stop_ids, stop=params_stop)
        self.logprobs = CompletionLogprobs(tok) if want_logprobs else None
        self.ids: list[int] = []
        self.pieces: list[str] = []
        self.lp_parts: list[dict[str, Any]] = []
        self.reason: str | None = None
        self.n_prompt = self.n_cached = 0
        self.counts_prompt = True  # False for a prompt's 2nd..nth choice: usage counts a prompt once

    def add(self, ev: TokenEvent) -> tuple[str, dict[str, Any] | None]:
        self.ids += ev.token_ids
        self.n_prompt, self.n_cached = ev.num_prompt_tokens, ev.num_cached_tokens
        self.reason = ev.finish_reason or self.reason
        delta = self.text.add(ev.token_ids, ev.finish_reason is not None)
        self.pieces.append(delta)
        lp = self.logprobs.add(ev.logprobs) if self.logprobs is not None and ev.logprobs else None
        if lp is not None:
            self.lp_parts.append(lp)
        return delta, lp


async def _completion(
    state: AppState, body: CompletionRequest, http: Request, tracker: RequestTracker, started: list[str]
) -> Response:
    model = state.check_model(body.model)
    state.admit()
    for name, bad in (
        ("best_of", body.best_of not in (None, 1, body.n)),
        ("echo", body.echo),
        ("suffix", body.suffix is not None),
    ):
        if bad:
            raise bad_request(f"{name} is not supported by this server", name)
    prompts = await asyncio.to_thread(_prompts, state, body)
    n = body.n or 1
    if len(prompts) * n > MAX_PROMPTS:
        raise bad_request(f"{len(prompts)} prompts x n={n} choices: at most {MAX_PROMPTS} per request", "n")
    base = f"cmpl-{uuid.uuid4().hex}"
    streams, choices = [], []
    for p, ids in enumerate(prompts):
        params = sampling_params(
            body,
            prompt_len=len(ids),
            prompt_param="prompt",
            max_model_len=state.backend.max_model_len,
            max_tokens=body.max_tokens,
            max_tokens_param="max_tokens",
            logprobs=body.logprobs,
            logprobs_param="logprobs",
            skip_special_tokens=True if body.skip_special_tokens is None else body.skip_special_tokens,
        )
        for j, choice_params in enumerate(per_choice(params)):  # choice index p * n + j, as OpenAI's
            i = p * n + j
            rid = f"{base}-{i}"
            request = GenerateRequest(rid, ids, choice_params, None)
            stream = await start(state, request, {"prompt_token_ids": "prompt"})
            started.append(rid)
            streams.append(events(state, rid, stream, tracker if i == 0 else state.metrics.tracker(ENDPOINT)))
            choices.append(_Choice(state, params.stop, set(params.stop_token_ids), body.logprobs is not None))
            choices[-1].counts_prompt = j == 0
    head = {"id": base, "object": "text_completion", "created": int(time.time()), "model": model}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return SSEResponse(_stream(head, streams, choices, tracker, include_usage))
    ok, result = await unless_disconnected(
        http, _collect(head, streams, choices, tracker, body.return_token_ids)
    )
    if not ok:
        tracker.finish(CLIENT_CLOSED, None)
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(result)


def _total_usage(choices: list[_Choice]) -> dict[str, Any]:
    prompts = [c for c in choices if c.counts_prompt]
    return usage(
        sum(c.n_prompt for c in prompts), sum(len(c.ids) for c in choices), sum(c.n_cached for c in prompts)
    )


async def _stream(
    head: dict[str, Any],
    streams: Sequence[AsyncIterator[TokenEvent]],
    choices: list[_Choice],
    tracker: RequestTracker,
    include_usage: bool,
) -> AsyncIterator[str]:
    status = CLIENT_CLOSED
    try:
        async with aclosing(merged(streams)) as evs:
            async for i, ev in evs:
                delta, lp = choices[i].add(ev)
                if delta or lp or ev.finish_reason:
                    obj: dict[str, Any] = {
                        **head,
                        "choices": [
                            {"index": i, "text": delta, "logprobs": lp, "finish_reason": ev.finish_reason}
                        ],
                    }
                    if include_usage:
                        obj["usage"] = None
                    yield sse(obj)
        if include_usage:
            yield sse({**head, "choices": [], "usage": _total_usage(choices)})
        status = 200
    except BackendError as e:
        err = from_backend_error(e)
        status = err.status
        yield sse(err.body())
    finally:
        tracker.finish(status, choices[0].reason)
    yield DONE


async def _collect(
    head: dict[str, Any],
    streams: Sequence[AsyncIterator[TokenEvent]],
    choices: list[_Choice],
    tracker: RequestTracker,
    return_token_ids: bool,
) -> dict[str, Any]:
    try:
        async with aclosing(merged(streams)) as evs:
            async for i, ev in evs:
                choices[i].add(ev)
    except BackendError as e:
        err = from_backend_error(e)
        tracker.finish(err.status, None)
        raise err from e
    out = []
    for i, c in enumerate(choices):
        choice: dict[str, Any] = {
            "index": i,
            "text": "".join(c.pieces),
            "logprobs": merge_completion_logprobs(c.lp_parts),
            "finish_reason": c.reason,
        }
        if return_token_ids:
            choice["token_ids"] = c.ids
        out.append(choice)
    tracker.finish(200, choices[0].reason)
    return {**head, "choices": out, "usage": _total_usage(choices)}
