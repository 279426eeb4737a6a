"""Per-request decoding settings, with vLLM's field names, defaults and ranges."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["GREEDY_TEMPERATURE_EPS", "SamplingParams", "SamplingParamsError"]

# Temperatures below this are greedy decoding (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-5


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; carries the field name and the offending value."""

    def __init__(self, field_name: str, value: object, allowed: str) -> None:
        super().__init__(f"{field_name}={value!r} is invalid: must be {allowed}")
        self.field_name = field_name
        self.value = value
        self.allowed = allowed


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request (OpenAI / vLLM semantics).

    n: completions per prompt. temperature: 0 (below 1e-5) means greedy argmax.
    top_p: nucleus mass in (0, 1]. top_k: keep the k most likely tokens; 0 or -1 means off
    (stored as 0). min_p: drop tokens below min_p * the top token's probability.
    seed: makes this request's samples reproducible, whatever else is in the batch.
    max_tokens / min_tokens: bounds on generated tokens (min_tokens suppresses EOS and
    stop_token_ids until reached). stop: strings that end generation (a str is one stop string).
    presence_penalty / frequency_penalty in [-2, 2] (OpenAI); repetition_penalty > 0 (1 = off),
    all computed from the generated tokens. logprobs: how many top log-probabilities to return per
    token besides the sampled one's (None = none).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise SamplingParamsError("stop", self.stop, "a non-empty string or a list of non-empty strings")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", list(self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)

        _check_int("n", self.n, 1)
        _check_float("temperature", self.temperature, lambda v: v >= 0.0, ">= 0 (0 = greedy)")
        _check_float("top_p", self.top_p, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        _check_int("top_k", self.top_k, 0, "0 or -1 (off), or >= 1")
        _check_float("min_p", self.min_p, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        if self.seed is not None and not (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64):
            raise SamplingParamsError("seed", self.seed, "None or an integer in [-2**63, 2**64)")
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise SamplingParamsError("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, 0, "non-negative token ids")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(name, getattr(self, name), lambda v: -2.0 <= v <= 2.0, "in [-2, 2]")
        _check_float("repetition_penalty", self.repetition_penalty, lambda v: v > 0.0, "> 0 (1 = off)")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, "None or >= 0")

    @property
    def is_greedy(self) -> bool:
        """Whether this request decodes by argmax."""
        return self.temperature < GREEDY_TEMPERATURE_EPS


def _check_int(name: str, value: object, minimum: int, allowed: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SamplingParamsError(name, value, allowed or f"an integer >= {minimum}")


def _check_float(name: str, value: object, in_range: Callable[[float], bool], allowed: str) -> None:
    """Raise unless `value` is a finite real number (not a bool) for which `in_range` holds."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and in_range(float(value))):  # type: ignore[arg-type]
        raise SamplingParamsError(name, value, allowed)
