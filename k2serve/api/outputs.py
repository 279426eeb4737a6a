"""Response pieces shared by the endpoints: usage and the two OpenAI log-probability layouts.

JSON has no infinities, so log-probabilities are clamped to >= -9999.0 (vLLM does the same).
"""

from __future__ import annotations

from typing import Any

from k2serve.chat.tokenizer import KimiTokenizer
from k2serve.engine.protocol import TokenLogprobs

MIN_LOGPROB = -9999.0


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _lp(value: float) -> float:
    return value if value >= MIN_LOGPROB else MIN_LOGPROB  # also maps NaN to the floor


def _token(tok: KimiTokenizer, token_id: int) -> tuple[str, list[int]]:
    data = tok.id_to_token_bytes(token_id)
    return data.decode("utf-8", errors="replace"), list(data)


def chat_logprobs(tok: KimiTokenizer, entries: list[TokenLogprobs]) -> dict[str, Any]:
    """Chat layout: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`."""
    content = []
    for e in entries:
        text, raw = _token(tok, e.token_id)
        top = []
        for tid, value in e.top:
            t_text, t_raw = _token(tok, tid)
            top.append({"token": t_text, "logprob": _lp(value), "bytes": t_raw})
        content.append({"token": text, "logprob": _lp(e.logprob), "bytes": raw, "top_logprobs": top})
    return {"content": content}


class CompletionLogprobs:
    """Legacy completions layout, accumulated over a stream: tokens, token_logprobs, top_logprobs
    (token text -> logprob) and text_offset (character offset of each token in the output)."""

    def __init__(self, tok: KimiTokenizer) -> None:
        self._tok = tok
        self._offset = 0

    def add(self, entries: list[TokenLogprobs]) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text, _ = _token(self._tok, e.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(_lp(e.logprob))
            out["top_logprobs"].append({_token(self._tok, tid)[0]: _lp(v) for tid, v in e.top})
            out["text_offset"].append(self._offset)
            self._offset += len(text)
        return out


def merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not parts:
        return None
    return {key: [x for p in parts for x in p[key]] for key in parts[0]}
