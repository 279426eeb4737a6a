"""A deterministic byte-level BPE trainer and writer of tiny Kimi-format tokenizers for tests.

`write_tokenizer(out_dir, num_ranks)` produces a checkpoint-style directory (`tiktoken.model` +
`tokenizer_config.json`) that `load_tokenizer` reads exactly like the real Kimi-K2 one, only with
`num_ranks` BPE ranks instead of 163,584; the 256 special ids follow the ranks.
"""

from __future__ import annotations

import base64
import heapq
import json
from collections import Counter
from itertools import count
from pathlib import Path

import regex

from k2serve.chat._corpus import CORPUS
from k2serve.chat.vocab import BOS, EOS, PAD, PAT_STR, UNK, special_token_names

_SPLIT = regex.compile(PAT_STR, flags=regex.V1)
_Pair = tuple[bytes, bytes]


class BpeTrainError(ValueError):
    """Bad training request; `value` is the offending argument."""

    def __init__(self, message: str, value: object) -> None:
        super().__init__(f"{message}: {value!r}")
        self.value = value


def train_bpe_ranks(text: str, num_ranks: int) -> dict[bytes, int]:
    """Learn exactly `num_ranks` byte-level BPE ranks from `text`.

    Ranks 0..255 are the single bytes in byte order; then come merges learned over the
    pre-tokenizer pieces of `text` (most frequent pair first, ties broken by the merged bytes),
    then, when the corpus runs out of pairs, filler tokens made by concatenating earlier
    tokens in a fixed order. The result depends only on (`text`, `num_ranks`).
    """
    if num_ranks < 256:
        raise BpeTrainError("num_ranks must be at least 256 (the single bytes)", num_ranks)
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    _learn_merges(text, ranks, num_ranks)
    _fill(ranks, num_ranks)
    return ranks


def _learn_merges(text: str, ranks: dict[bytes, int], num_ranks: int) -> None:
    """Add merges to `ranks` (in place) until `num_ranks` or no adjacent pair is left."""
    piece_freq = Counter(p.encode("utf-8") for p in _SPLIT.findall(text))
    words: list[list[bytes]] = [[bytes([b]) for b in piece] for piece in sorted(piece_freq)]
    freqs: list[int] = [piece_freq[piece] for piece in sorted(piece_freq)]
    pair_counts: Counter[_Pair] = Counter()
    where: dict[_Pair, set[int]] = {}
    for idx, word in enumerate(words):
        for pair in zip(word, word[1:], strict=False):
            pair_counts[pair] += freqs[idx]
            where.setdefault(pair, set()).add(idx)
    heap = [(-n, a + b, a, b) for (a, b), n in pair_counts.items()]
    heapq.heapify(heap)

    while heap and len(ranks) < num_ranks:
        neg, merged, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -neg or neg == 0:
            continue  # stale heap entry
        if merged not in ranks:
            ranks[merged] = len(ranks)
        changed: set[_Pair] = set()
        for idx in sorted(where.pop((a, b), set())):
            word, freq = words[idx], freqs[idx]
            for pair in zip(word, word[1:], strict=False):
                pair_counts[pair] -= freq
                changed.add(pair)
            words[idx] = word = _merge_word(word, a, b, merged)
            for pair in zip(word, word[1:], strict=False):
                pair_counts[pair] += freq
                where.setdefault(pair, set()).add(idx)
                changed.add(pair)
        for pair in changed:
            n = pair_counts[pair]
            if n > 0:
                heapq.heappush(heap, (-n, pair[0] + pair[1], pair[0], pair[1]))
            else:
                pair_counts.pop(pair, None)
                where.pop(pair, None)


def _merge_word(word: list[bytes], a: bytes, b: bytes, merged: bytes) -> list[bytes]:
    """Replace every non-overlapping (a, b) in `word`, left to right, by `merged`."""
    out: list[bytes] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _fill(ranks: dict[bytes, int], num_ranks: int) -> None:
    """Pad `ranks` to `num_ranks` with concatenations of earlier word-like tokens (in place).

    Components are the learned tokens that are valid UTF-8 plus the printable ASCII bytes, in
    rank order; pairs are visited along anti-diagonals (i + j = 0, 1, 2, ...) of the growing
    component list, skipping a second half that starts with whitespace.
    """
    parts = [tok for tok in sorted(ranks, key=ranks.__getitem__) if _word_like(tok)]
    for s in count():
        if len(ranks) >= num_ranks:
            return
        for i in range(min(s, len(parts) - 1) + 1):
            j = s - i
            if j >= len(parts):
                continue
            cand = parts[i] + parts[j]
            if parts[j][:1].isspace() or cand in ranks:
                continue
            ranks[cand] = len(ranks)
            parts.append(cand)
            if len(ranks) >= num_ranks:
                return


def _word_like(tok: bytes) -> bool:
    if len(tok) == 1:
        return 0x21 <= tok[0] <= 0x7E
    try:
        tok.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def write_tokenizer(out_dir: str | Path, num_ranks: int) -> None:
    """Train on the embedded corpus and write `tiktoken.model` + `tokenizer_config.json`.

    The config lists all 256 special tokens in Hugging Face's `added_tokens_decoder` form with
    the Kimi names at the Kimi offsets; it has no `chat_template` key.
    """
    write_tokenizer_files(out_dir, train_bpe_ranks(CORPUS, num_ranks))


def write_tokenizer_files(out_dir: str | Path, ranks: dict[bytes, int]) -> None:
    """Write `ranks` as `tiktoken.model` and a `tokenizer_config.json` naming the 256 special tokens
    (Kimi's names at Kimi's offsets after the ranks) in Hugging Face's `added_tokens_decoder` form."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_ranks = len(ranks)
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in ranks.items()]
    (out / "tiktoken.model").write_text("".join(lines), encoding="ascii")
    added = {
        str(i): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, name in special_token_names(num_ranks).items()
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1048576,
        "tokenizer_class": "TikTokenTokenizer",
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
