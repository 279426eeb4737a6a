"""OpenAI request fields -> SamplingParams, with errors that name the request's own field."""

from __future__ import annotations

import dataclasses
from typing import Any

from k2serve.api.errors import APIError, bad_request
from k2serve.api.schemas import SamplingFields
from k2serve.engine.sampling_params import SamplingParams, SamplingParamsError


def sampling_params(
    body: SamplingFields,
    *,
    prompt_len: int,
    prompt_param: str,
    max_model_len: int,
    max_tokens: int | None,
    max_tokens_param: str,
    logprobs: int | None,
    logprobs_param: str,
    skip_special_tokens: bool = True,
) -> SamplingParams:
    """SamplingParams for one prompt of `body`.

    A prompt that leaves no room for output raises a 400 naming `prompt_param` and the context limit. `max_tokens`
    None means "up to the context limit"; an explicit value over the limit is a 400 naming
    `max_tokens_param` and the limit. Range errors name the request field they came from.
    """
    if prompt_len >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{prompt_len} tokens, which leaves no room for the completion.",
            prompt_param,
            "context_length_exceeded",
        )
    if (
        max_tokens is not None
        and not isinstance(max_tokens, bool)
        and prompt_len + max_tokens > max_model_len
    ):
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
            f"Reduce the prompt or {max_tokens_param}.",
            max_tokens_param,
            "context_length_exceeded",
        )
    fields: dict[str, Any] = {
        "n": body.n,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "seed": body.seed,
        "max_tokens": max_model_len - prompt_len if max_tokens is None else max_tokens,
        "min_tokens": body.min_tokens,
        "stop": body.stop,
        "stop_token_ids": body.stop_token_ids,
        "ignore_eos": body.ignore_eos,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
        "logprobs": logprobs,
        "skip_special_tokens": skip_special_tokens,
    }
    names = {"max_tokens": max_tokens_param, "logprobs": logprobs_param}
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except SamplingParamsError as e:
        param = names.get(e.field_name, e.field_name)
        raise bad_request(f"{param}={e.value!r} is invalid: must be {e.allowed}", param) from e
    except (TypeError, ValueError) as e:
        raise APIError(400, f"invalid sampling parameters: {e}", param=None) from e


def per_choice(params: SamplingParams) -> list[SamplingParams]:
    """The `params.n` requests that give a request's n choices: each n=1, and with a seed, choice j
    seeded `seed + j` (reproducible, and the choices differ from each other)."""
    return [
        dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + j)
        for j in range(params.n)
    ]
