"""The Kimi tokenizer: tiktoken BPE ranks + 256 named special tokens, and streaming detokenization.

A checkpoint directory holds `tiktoken.model` (one `base64(token bytes) rank` per line, ranks
0..N-1) and `tokenizer_config.json` (Hugging Face layout: `added_tokens_decoder` maps an id
string to `{"content": name, "special": true}`; `bos_token`, `eos_token`, `pad_token`,
`unk_token`; optionally `chat_template`). Special ids are N..N+255; ids missing from
`added_tokens_decoder` are named `<|reserved_token_{id}|>`.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tiktoken

from k2serve.chat.vocab import (
    BOS,
    EOS,
    IM_END,
    NUM_SPECIAL_TOKENS,
    PAD,
    PAT_STR,
    UNK,
    special_token_names,
)

RANKS_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"

# tiktoken is slow (quadratic) on very long runs of whitespace or of non-whitespace, so long
# inputs are cut into such runs of at most this many characters before encoding (as Kimi does).
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{_MAX_RUN_CHARS + 1},}}|\S{{{_MAX_RUN_CHARS + 1},}}")


class TokenizerError(ValueError):
    """A malformed tokenizer file, unknown token or out-of-range id; `value` is the culprit."""

    def __init__(self, message: str, value: object) -> None:
        super().__init__(f"{message}: {value!r}")
        self.value = value


class KimiTokenizer:
    """Byte-level BPE over Kimi's Han-aware split pattern, with Kimi's special-token block.

    `eos_id` is `<|im_end|>` (the end of an assistant turn, where generation stops);
    `stop_ids` adds `[EOS]`. `vocab_size` = number of ranks + 256.
    """

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_names: dict[int, str] | None = None,
        *,
        bos_token: str = BOS,
        pad_token: str = PAD,
        unk_token: str = UNK,
        chat_template: str | None = None,
        name: str = "kimi",
    ) -> None:
        num_ranks = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(num_ranks)):
            raise TokenizerError("BPE ranks must be exactly 0..N-1", num_ranks)
        names = special_token_names(num_ranks)
        for sid, sname in (special_names or {}).items():
            if sid not in names:
                raise TokenizerError(f"special id outside {num_ranks}..{num_ranks + 255}", sid)
            names[sid] = sname
        self._special_ids: dict[str, int] = {n: i for i, n in names.items()}
        if len(self._special_ids) != NUM_SPECIAL_TOKENS:
            raise TokenizerError("duplicate special token names", sorted(names.values()))
        self._special_names = names
        self._num_ranks = num_ranks
        self._ranks = MappingProxyType(mergeable_ranks)
        self._enc = tiktoken.Encoding(
            name,
            pat_str=PAT_STR,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self._special_ids,
            explicit_n_vocab=num_ranks + NUM_SPECIAL_TOKENS,
        )
        self.chat_template = chat_template
        self._bos_id = self.token_to_id(bos_token)
        self._pad_id = self.token_to_id(pad_token)
        self._unk_id = self.token_to_id(unk_token)
        self._eos_id = self.token_to_id(IM_END)
        self._stop_ids = frozenset({self._eos_id, self.token_to_id(EOS)})

    # ----- sizes and ids -----
    @property
    def vocab_size(self) -> int:
        return self._num_ranks + NUM_SPECIAL_TOKENS

    @property
    def num_ranks(self) -> int:
        """Number of BPE ranks, which is also the first special id."""
        return self._num_ranks

    @property
    def mergeable_ranks(self) -> Mapping[bytes, int]:
        """Read-only view of the BPE ranks (token bytes -> id), e.g. for grammar engines."""
        return self._ranks

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """`<|im_end|>`: generation of an assistant turn stops here."""
        return self._eos_id

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: `<|im_end|>` and `[EOS]`."""
        return self._stop_ids

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def special_ids(self) -> dict[str, int]:
        """Name -> id for all 256 special tokens (a copy)."""
        return dict(self._special_ids)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_names

    def token_to_id(self, name: str) -> int:
        """Id of a special token name, or of a plain token given as its (UTF-8) text."""
        if name in self._special_ids:
            return self._special_ids[name]
        try:
            return self._enc.encode_single_token(name.encode("utf-8"))
        except KeyError:
            raise TokenizerError("unknown token", name) from None

    def id_to_token_bytes(self, token_id: int) -> bytes:
        """Bytes of one token; a special token gives the UTF-8 of its name."""
        self._check_id(token_id)
        if token_id in self._special_names:
            return self._special_names[token_id].encode("utf-8")
        return self._enc.decode_single_token_bytes(token_id)

    # ----- text <-> ids -----
    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`. With `allow_special`, special-token names in `text` become their
        ids; without it they are encoded as ordinary text. Never raises on any `str`.

        Runs of more than 25,000 whitespace or non-whitespace characters are encoded in pieces
        (as Kimi's own tokenizer does), so BPE merges and special names do not span those cuts.
        """
        kwargs: dict[str, Any] = {"allowed_special": "all"} if allow_special else {"disallowed_special": ()}
        if not _LONG_RUN.search(text):
            return self._enc.encode(text, **kwargs)
        ids: list[int] = []
        for chunk in _split_long_runs(text, _MAX_RUN_CHARS):
            ids.extend(self._enc.encode(chunk, **kwargs))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD. Raises TokenizerError on an id outside
        the vocabulary."""
        ids = list(ids)
        for i in ids:
            self._check_id(i)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_names]
        return self._enc.decode(ids, errors="replace")

    def _check_id(self, token_id: int) -> None:
        if not (isinstance(token_id, int) and 0 <= token_id < self.vocab_size):
            raise TokenizerError(f"token id outside 0..{self.vocab_size - 1}", token_id)


class IncrementalDecoder:
    """Streaming detokenizer: `add(id)` returns the text that became final with that token.

    Bytes of a UTF-8 character split across tokens are held back until the character is
    complete; `finish()` flushes what is left (an unfinished character becomes U+FFFD). The
    concatenation of every `add` result and `finish()` equals `tokenizer.decode(ids, ...)`.
    """

    def __init__(self, tokenizer: KimiTokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        data = self._tok.id_to_token_bytes(token_id)
        if self._skip and self._tok.is_special(token_id):
            return ""
        return self._utf8.decode(data)

    def add_many(self, ids: Iterable[int]) -> str:
        return "".join(self.add(i) for i in ids)

    def finish(self) -> str:
        return self._utf8.decode(b"", final=True)


def _split_long_runs(text: str, limit: int) -> Iterator[str]:
    """Cut `text` so that no piece holds more than `limit` consecutive (non-)whitespace chars."""
    start = run = 0
    prev_space = text[:1].isspace()
    for i, ch in enumerate(text):
        space = ch.isspace()
        if space != prev_space:
            prev_space, run = space, 1
            continue
        run += 1
        if run > limit:
            yield text[start:i]
            start, run = i, 1
    yield text[start:]


def _token_name(value: object, field: str) -> str:
    """Token name from a config field that is a string or an AddedToken dict."""
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    if isinstance(value, str):
        return value
    raise TokenizerError(f"{CONFIG_FILE}: bad {field}", value)


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken ranks file (`base64 rank` per line; blank lines ignored)."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="ascii").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            tok, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (IndexError, ValueError, binascii.Error):
            raise TokenizerError(f"{path}:{lineno}: expected 'base64 rank'", line) from None
        if tok in ranks:
            raise TokenizerError(f"{path}:{lineno}: duplicate token", tok)
        ranks[tok] = rank
    return ranks


def load_tokenizer(model_dir: str | Path) -> KimiTokenizer:
    """Load `tiktoken.model` + `tokenizer_config.json` from a checkpoint directory."""
    root = Path(model_dir)
    ranks = read_ranks(root / RANKS_FILE)
    config_path = root / CONFIG_FILE
    config: dict[str, Any] = (
        json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    )
    names: dict[int, str] = {}
    for key, entry in config.get("added_tokens_decoder", {}).items():
        if not key.isdigit():
            raise TokenizerError(f"{config_path}: bad added_tokens_decoder key", key)
        names[int(key)] = _token_name(entry, "added_tokens_decoder entry")
    template = config.get("chat_template")
    return KimiTokenizer(
        ranks,
        names,
        bos_token=_token_name(config.get("bos_token") or BOS, "bos_token"),
        pad_token=_token_name(config.get("pad_token") or PAD, "pad_token"),
        unk_token=_token_name(config.get("unk_token") or UNK, "unk_token"),
        chat_template=template if isinstance(template, str) else None,
        name=root.name or "kimi",
    )
