"""The one check of a request against a model, and grammar compilation of structured-output specs.

`validate_request` refuses what no backend could run, raising InvalidRequestError that names the
field, its value and the limit. Every path runs it: the offline engine (`LLMEngine.validate`), the
local backend (`AsyncEngine`), the router before it dispatches, the workers when a request arrives.
`compile_structured` turns a `GenerateRequest.structured` spec into a GrammarConstraint for a
tokenizer; the router can run it before dispatching, a worker compiles the spec it receives with its
own GrammarCompiler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from k2serve.chat.structured import GrammarCompiler, GrammarConstraint, StructuredOutputError
from k2serve.engine.protocol import InvalidRequestError
from k2serve.engine.sampling_params import SamplingParams

MAX_LOGPROBS = 20  # top log-probabilities per token at most over the APIs (OpenAI's and vLLM's limit)


def validate_request(
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    *,
    vocab_size: int,
    max_model_len: int,
    max_logprobs: int = MAX_LOGPROBS,
) -> None:
    """Raise InvalidRequestError unless the prompt and `params` fit a model with this vocabulary and
    context (prompt + output tokens at most `max_model_len`), asking for at most `max_logprobs`
    top log-probabilities per token."""
    ids, p, vocab, limit = prompt_token_ids, params, vocab_size, max_model_len
    if not isinstance(p, SamplingParams):
        raise InvalidRequestError("params must be SamplingParams", "params", type(p).__name__)
    if not isinstance(ids, list) or not ids:
        raise InvalidRequestError(
            "the prompt is empty: at least one token is required", "prompt_token_ids", ids
        )
    bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
    if bad is not None:
        msg = f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})"
        raise InvalidRequestError(msg, "prompt_token_ids", bad)
    if len(ids) >= limit:
        msg = f"the prompt has {len(ids)} tokens; the model's context length is {limit} (prompt + output)"
        raise InvalidRequestError(msg, "prompt_token_ids", len(ids), limit)
    if len(ids) + p.max_tokens > limit:
        msg = (
            f"max_tokens={p.max_tokens} is too large: the prompt has {len(ids)} tokens and the model's "
            f"context length is {limit} tokens, so at most {limit - len(ids)} can be generated"
        )
        raise InvalidRequestError(msg, "max_tokens", p.max_tokens, limit)
    if p.n != 1:
        raise InvalidRequestError(f"n={p.n} is not supported: only n=1", "n", p.n)
    if p.logprobs is not None and p.logprobs > max_logprobs:
        msg = f"logprobs={p.logprobs} is too large: at most {max_logprobs}"
        raise InvalidRequestError(msg, "logprobs", p.logprobs, max_logprobs)
    if p.top_k > vocab:
        raise InvalidRequestError(
            f"top_k={p.top_k} exceeds the vocabulary size {vocab}", "top_k", p.top_k, vocab
        )
    bad = next((t for t in p.stop_token_ids if t >= vocab), None)
    if bad is not None:
        msg = f"stop_token_ids: token id {bad} is outside the vocabulary [0, {vocab})"
        raise InvalidRequestError(msg, "stop_token_ids", bad, vocab)


def compile_structured(compiler: GrammarCompiler, structured: dict[str, Any]) -> GrammarConstraint | None:
    """The GrammarConstraint (or None: nothing to constrain) for a GenerateRequest.structured spec;
    raises InvalidRequestError naming "response_format" or "tool_choice" when the spec cannot be compiled."""
    if not isinstance(structured, dict) or not ({"response_format", "tool_choice"} & structured.keys()):
        raise InvalidRequestError(
            "structured must hold response_format or tool_choice", "structured", structured
        )
    param = "response_format" if "response_format" in structured else "tool_choice"
    allow_reasoning = bool(structured.get("allow_reasoning", False))
    try:
        if param == "response_format":
            return compiler.for_response_format(structured["response_format"], allow_reasoning)
        parallel = structured.get("parallel_tool_calls", True) is not False
        return compiler.for_tool_choice(
            structured.get("tools"), structured["tool_choice"], allow_reasoning, parallel
        )
    except (StructuredOutputError, ValueError, TypeError, AttributeError, KeyError) as e:
        raise InvalidRequestError(f"cannot build a grammar for {param}: {e}", param, structured[param]) from e
