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
    text: the prompt as text, for the chat endpoints (which take messages, not token ids); None when
    only the token ids are known (random token and trace requests).
    """

    index: int
    prompt: tuple[int, ...]
    output_len: int
    arrival_s: float | None = None
    best_cached_tokens: int = 0
    text: str | None = None


class LengthRangeError(ValueError):
    """A (low, high) length range that is empty or not positive; `name` and `value` are it."""

    def __init__(self, name: str, value: tuple[int, int]) -> None:
        super().__init__(f"{name} must be 1 <= low <= high, got {value[0]}:{value[1]}")
        self.name = name
        self.value = value


def check_ranges(input_len: tuple[int, int], output_len: tuple[int, int]) -> None:
    """Raise LengthRangeError unless both ranges are 1 <= low <= high."""
    for name, value in (("input_len", input_len), ("output_len", output_len)):
        if not 1 <= value[0] <= value[1]:
            raise LengthRangeError(name, value)


def random_requests(
    seed: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int
) -> Iterator[BenchRequest]:
    """An endless, seeded stream of requests with uniform random token ids in [0, vocab_size) and
    input/output lengths (tokens) drawn uniformly from the inclusive ranges; the caller bounds it."""
    check_ranges(input_len, output_len)
    rng = np.random.default_rng(seed)
    index = 0
    while True:
        n_in = int(rng.integers(input_len[0], input_len[1] + 1))
        n_out = int(rng.integers(output_len[0], output_len[1] + 1))
        prompt = tuple(int(t) for t in rng.integers(0, vocab_size, size=n_in))
        yield BenchRequest(index, prompt, n_out)
        index += 1


# Common English words: one token each for a large BPE vocabulary (K2's), so N words make a prompt of about
# N tokens without the client needing the server's tokenizer (a small vocabulary, e.g. the tiny preset's,
# splits them into ~2.3 tokens each).
_WORD_LIST = (
    "the of and to in is that it for on with as was at by be this from or have an are not but had his they"
    " you were her she there been one all we their has would when which who will more no if out so said what"
    " up its about into than them can only other new some time could these two may then do first any my now"
    " such like our over man me even most made after also did many before must through back years where much"
    " your way well down should because each just those people how too little state good very make world still"
    " own see men work long get here between both life being under never day same another know while last"
)
WORDS = tuple(_WORD_LIST.split())


def random_words(rng: np.random.Generator, n: int) -> str:
    """`n` words drawn uniformly from WORDS, space-separated."""
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=n))


def random_text_requests(
    seed: int, input_len: tuple[int, int], output_len: tuple[int, int]
) -> Iterator[BenchRequest]:
    """The random dataset for the chat endpoints: like `random_requests` but each prompt is `text` of
    input-length random words (see WORDS) and `prompt` is empty; endless, seeded."""
    check_ranges(input_len, output_len)
    rng = np.random.default_rng([seed, 2])
    index = 0
    while True:
        n_in = int(rng.integers(input_len[0], input_len[1] + 1))
        n_out = int(rng.integers(output_len[0], output_len[1] + 1))
        yield BenchRequest(index, (), n_out, text=random_words(rng, n_in))
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
