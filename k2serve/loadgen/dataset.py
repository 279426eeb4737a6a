"""What a benchmark sends: `BenchRequest`s, from the random dataset (here) or a trace (`trace.py`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BenchRequest:
    """One request to send.

    prompt: token ids. output_len: tokens to generate (sent as max_tokens with ignore_eos).
    arrival_s: offset of the arrival from the start of the run (seconds) when a trace fixes it,
    None when the run's arrival process (request rate) decides. best_cached_tokens: prompt tokens
    an infinite prefix cache would hold when this request arrives (0 for the random dataset).
    """

    index: int
    prompt: tuple[int, ...]
    output_len: int
    arrival_s: float | None = None
    best_cached_tokens: int = 0


class LengthRangeError(ValueError):
    """A (low, high) length range that is empty or not positive; `name` and `value` are it."""

    def __init__(self, name: str, value: tuple[int, int]) -> None:
        super().__init__(f"{name} must be 1 <= low <= high, got {value[0]}:{value[1]}")
        self.name = name
        self.value = value


def random_requests(
    seed: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int
) -> Iterator[BenchRequest]:
    """An endless, seeded stream of requests with uniform random token ids in [0, vocab_size) and
    input/output lengths (tokens) drawn uniformly from the inclusive ranges; the caller bounds it."""
    for name, value in (("input_len", input_len), ("output_len", output_len)):
        if not 1 <= value[0] <= value[1]:
            raise LengthRangeError(name, value)
    rng = np.random.default_rng(seed)
    index = 0
    while True:
        n_in = int(rng.integers(input_len[0], input_len[1] + 1))
        n_out = int(rng.integers(output_len[0], output_len[1] + 1))
        prompt = tuple(int(t) for t in rng.integers(0, vocab_size, size=n_in))
        yield BenchRequest(index, prompt, n_out)
        index += 1


def poisson_arrivals(rate: float, seed: int) -> Iterator[float]:
    """Endless arrival offsets (seconds from the run start) of a Poisson process of `rate` requests/s;
    all 0.0 when `rate` is infinite (every request at once)."""
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 requests/s, got {rate}")
    rng = np.random.default_rng([seed, 1])  # apart from the dataset's stream
    t = 0.0
    while True:
        yield t
        if rate != float("inf"):
            t += float(rng.exponential(1.0 / rate))
