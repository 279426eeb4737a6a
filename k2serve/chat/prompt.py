"""Chat messages to prompt token ids, without letting message text become special tokens.

How injection is prevented (escape, render, split):

1. Every string in the messages and tools, dict keys included, is escaped before rendering: each
   special-token name in it (and the escape character ESC itself) becomes ESC + a private-use code
   character. So that no special name can be formed across the edge of a string either, its first
   character is escaped when it begins with the end of some special name (template text before it
   could supply the start), and its last character when it ends with the start of one.
2. The chat template (the native K2 renderer, or the checkpoint's own Jinja template) renders the
   escaped data. Every special-token name in the result therefore comes from the template.
3. The rendered text is split at those names, which become their ids; the text between them is
   unescaped and encoded with `allow_special=False`, so "<|im_end|>" typed by a user is plain text.

For ordinary input (no special-name text, no ESC) the escape changes nothing, so the ids equal
`tokenizer.encode(rendered, allow_special=True)` exactly, BPE merges across message boundaries included.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from k2serve.chat.template import apply_chat_template
from k2serve.chat.tokenizer import KimiTokenizer

ESC = "\U0010fffd"  # a noncharacter: never meaningful in real text
_CODE_BASE = 0xF0000  # private-use plane 15: code chars follow ESC
_CHAR_CODE_BASE = _CODE_BASE + 512  # ESC + chr(_CHAR_CODE_BASE + ord(c)) is the single char c


class PromptEncoder:
    """Renders and encodes chat prompts for one tokenizer; see the module docstring for the contract."""

    def __init__(self, tokenizer: KimiTokenizer) -> None:
        self._tok = tokenizer
        self._ids = tokenizer.special_ids
        names = sorted(self._ids, key=len, reverse=True)
        self._code = {name: chr(_CODE_BASE + i) for i, name in enumerate(names)} | {
            ESC: chr(_CODE_BASE + 256)
        }
        self._decode = {code: text for text, code in self._code.items()}
        self._escape_re = re.compile("|".join(re.escape(n) for n in [ESC, *names]))
        self._special_re = re.compile("|".join(re.escape(n) for n in names))
        self._unescape_re = re.compile(re.escape(ESC) + "(.)", re.DOTALL)
        self._prefixes = {n[:k] for n in names for k in range(1, len(n))}
        self._suffixes = {n[k:] for n in names for k in range(1, len(n))}
        self._longest = max(len(n) for n in names)

    @property
    def tokenizer(self) -> KimiTokenizer:
        """The tokenizer prompts are encoded with (its `chat_template`, if any, is the checkpoint's)."""
        return self._tok

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
    ) -> str:
        """The escaped prompt text (with the generation prompt); input to `encode_rendered`."""
        return apply_chat_template(
            self.escape(list(messages)),
            self.escape(list(tools)) if tools else None,
            add_generation_prompt=True,
            chat_template=chat_template,
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
    ) -> list[int]:
        """Prompt ids for `messages`; raises ChatTemplateError (or jinja2.TemplateError) on bad messages."""
        return self.encode_rendered(self.render(messages, tools, chat_template))

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of a rendered, escaped prompt: special names are ids, everything else plain text."""
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            ids += self._tok.encode(self.unescape(text[pos : m.start()]), allow_special=False)
            ids.append(self._ids[m.group()])
            pos = m.end()
        ids += self._tok.encode(self.unescape(text[pos:]), allow_special=False)
        return ids

    def escape(self, value: Any) -> Any:
        """`value` with every string (keys too) escaped, recursively; other values unchanged."""
        if isinstance(value, str):
            return self._escape_str(value)
        if isinstance(value, Mapping):
            return {self.escape(k): self.escape(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.escape(v) for v in value]
        return value

    def unescape(self, text: str) -> str:
        return self._unescape_re.sub(self._unescape_one, text)

    def _escape_str(self, s: str) -> str:
        s = self._escape_re.sub(lambda m: ESC + self._code[m.group()], s)
        edge = min(len(s), self._longest - 1)
        if any(s[:k] in self._suffixes for k in range(1, edge + 1)):
            s = self._escape_char(s[0]) + s[1:]
        edge = min(len(s), self._longest - 1)
        if any(s[-k:] in self._prefixes for k in range(1, edge + 1)):
            s = s[:-1] + self._escape_char(s[-1])
        return s

    @staticmethod
    def _escape_char(c: str) -> str:
        return ESC + chr(_CHAR_CODE_BASE + ord(c))  # c is a character of a special name: ASCII in practice

    def _unescape_one(self, m: re.Match[str]) -> str:
        code = m.group(1)
        if code in self._decode:
            return self._decode[code]
        offset = ord(code) - _CHAR_CODE_BASE
        return chr(offset) if offset >= 0 else m.group(0)
