"""vLLM `bench serve` text datasets: ShareGPT JSON and CustomDataset JSONL, tokenized into `BenchRequest`s.

ShareGPT (`--dataset-name sharegpt`): a JSON list of `{"conversations": [{"from": ..., "value": ...}, ...]}`.
As vLLM's ShareGPTDataset: entries with fewer than two turns are dropped, the rest shuffled with the seed
(numpy's generator, so not in vLLM's order); turn 0's value is the prompt and turn 1's token length the output length (or `--sharegpt-output-len`);
pairs with a prompt or output under 4 tokens (the output check only when the length is not fixed), a
prompt over 1024 tokens or prompt + output over 2048 tokens are skipped.

Custom (`--dataset-name custom`): JSONL, one `{"prompt": text}` per line, optionally `"output_tokens": n`;
as vLLM's CustomDataset the lines are shuffled with the seed, and the output length is
`--custom-output-len` when given, else the line's `output_tokens`, else 256 (vLLM's default).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from k2serve.loadgen.dataset import BenchRequest

SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048
CUSTOM_DEFAULT_OUTPUT_LEN = 256

Encode = Callable[[str], Sequence[int]]


class DatasetFormatError(ValueError):
    """A dataset file, entry or line that is malformed; `source` and `where` ("entry 3", "line 7") name it."""

    def __init__(self, source: str, where: str | None, reason: str) -> None:
        super().__init__(f"{source}: {where}: {reason}" if where else f"{source}: {reason}")
        self.source = source
        self.where = where
        self.reason = reason


def is_valid_sequence(prompt_len: int, output_len: int, check_output: bool) -> bool:
    """vLLM's ShareGPT filter."""
    too_short = prompt_len < SHAREGPT_MIN_LEN or (check_output and output_len < SHAREGPT_MIN_LEN)
    too_long = prompt_len > SHAREGPT_MAX_PROMPT_LEN or prompt_len + output_len > SHAREGPT_MAX_TOTAL_LEN
    return not (too_short or too_long)


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value


def read_sharegpt(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, completion) of each entry with two or more turns, in file order."""
    source = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetFormatError(source, f"line {e.lineno}", f"not JSON ({e.msg})") from e
    if not isinstance(data, list):
        raise DatasetFormatError(source, None, f"a ShareGPT file is a JSON list, got {type(data).__name__}")
    pairs = []
    for i, entry in enumerate(data):
        try:
            if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
                raise ValueError('must be an object with a "conversations" list')
            turns = entry["conversations"]
            if len(turns) < 2:
                continue  # vLLM drops these
            for t, turn in enumerate(turns[:2]):
                if not isinstance(turn, dict) or "value" not in turn:
                    raise ValueError(f'conversations[{t}] must be an object with a "value"')
            pairs.append((_string(turns[0]["value"], "conversations[0].value"),
                          _string(turns[1]["value"], "conversations[1].value")))  # fmt: skip
        except ValueError as e:
            raise DatasetFormatError(source, f"entry {i}", str(e)) from e
    return pairs


def read_custom(path: str | Path) -> list[tuple[str, int | None]]:
    """(prompt, output_tokens or None) of each non-blank line, in file order."""
    source = str(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not JSON ({e.msg})") from e
                if not isinstance(obj, dict) or "prompt" not in obj:
                    raise ValueError('must be a JSON object with a "prompt"')
                n = obj.get("output_tokens")
                if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                    raise ValueError(f"output_tokens must be an integer >= 1, got {n!r}")
                out.append((_string(obj["prompt"], "prompt"), n))
            except ValueError as e:
                raise DatasetFormatError(source, f"line {line_no}", str(e)) from e
    return out


def sharegpt_requests(
    path: str | Path, encode: Encode, seed: int, num_prompts: int | None, output_len: int | None
) -> list[BenchRequest]:
    """Up to `num_prompts` requests (all valid pairs when None), as vLLM samples them."""
    pairs = read_sharegpt(path)
    pairs = [pairs[i] for i in np.random.default_rng(seed).permutation(len(pairs))]
    reqs: list[BenchRequest] = []
    for prompt, completion in pairs:
        if num_prompts is not None and len(reqs) >= num_prompts:
            break
        ids = tuple(encode(prompt))
        n_out = len(encode(completion)) if output_len is None else output_len
        if is_valid_sequence(len(ids), n_out, check_output=output_len is None):
            reqs.append(BenchRequest(len(reqs), ids, n_out, text=prompt))
    return reqs


def custom_requests(
    path: str | Path, encode: Encode, seed: int, num_prompts: int | None, output_len: int | None
) -> list[BenchRequest]:
    """Up to `num_prompts` requests (all lines when None); a prompt that encodes to no tokens is an error."""
    lines = read_custom(path)
    lines = [lines[i] for i in np.random.default_rng(seed).permutation(len(lines))]
    reqs: list[BenchRequest] = []
    for prompt, n in lines[:num_prompts]:
        ids = tuple(encode(prompt))
        if not ids:
            raise DatasetFormatError(str(path), None, f"prompt {prompt!r} encodes to no tokens")
        n_out = output_len if output_len is not None else n if n is not None else CUSTOM_DEFAULT_OUTPUT_LEN
        reqs.append(BenchRequest(len(reqs), ids, n_out, text=prompt))
    return reqs
