"""POST /tokenize and POST /detokenize in vLLM's shapes.

/tokenize takes either `prompt` (text, encoded as /v1/completions encodes it) or `messages` (with
optional `tools`, rendered and encoded by the one chat path exactly as /v1/chat/completions would
prompt the model) and returns `{"count", "max_model_len", "tokens", "token_strs"}` (`token_strs` when
`return_token_strs`). /detokenize takes `tokens` and returns `{"prompt"}`. Both need the API key like
the /v1 routes; errors are 400s in OpenAI's shape naming the field.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, model_validator

from k2serve.api.errors import bad_request
from k2serve.api.runner import AppState
from k2serve.api.schemas import ChatMessage, ToolSpec
from k2serve.chat.request import ChatRequestError, plan_chat
from k2serve.chat.tokenizer import TokenizerError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolSpec] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def install_tokenize_routes(app: FastAPI, state: AppState, auth: list[Any]) -> None:
    tok = state.backend.tokenizer

    @app.post("/tokenize", dependencies=auth)
    async def _tokenize(body: TokenizeRequest) -> JSONResponse:
        state.check_model(body.model)
        if body.prompt is not None:
            ids = tok.encode(body.prompt)
        else:
            try:
                plan = plan_chat(
                    [m.model_dump(exclude_none=True) for m in body.messages or []],
                    [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
                )
                ids = await asyncio.to_thread(plan.prompt, state.encoder)
            except ChatRequestError as e:
                raise bad_request(str(e), e.param) from e
        strs = [tok.id_to_token_bytes(i).decode("utf-8", errors="replace") for i in ids]
        return JSONResponse(
            {
                "count": len(ids),
                "max_model_len": state.backend.max_model_len,
                "tokens": ids,
                "token_strs": strs if body.return_token_strs else None,
            }
        )

    @app.post("/detokenize", dependencies=auth)
    async def _detokenize(body: DetokenizeRequest) -> JSONResponse:
        state.check_model(body.model)
        try:
            return JSONResponse({"prompt": tok.decode(body.tokens)})
        except TokenizerError as e:
            raise bad_request(str(e), "tokens") from e
