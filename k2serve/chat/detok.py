"""Generated token ids to the text a client sees, incrementally.

The backend streams token ids; this turns them into final text deltas: special tokens are dropped
(except the ones a downstream parser needs, such as the tool-call markers), the token that ended
generation is dropped, and the text is cut before the first stop string (vLLM's behaviour), holding
back just enough characters that a stop string split across deltas is never sent.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from k2serve.chat.tokenizer import IncrementalDecoder, KimiTokenizer
from k2serve.chat.vocab import (
    THINK_BEGIN,
    THINK_END,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
)

REASONING_MARKERS = (THINK_BEGIN, THINK_END)
TOOL_MARKERS = (
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_END,
)


class OutputText:
    """One request's output text.

    `skip_special_tokens`: drop special tokens except those named in `keep` (their text is kept for
    the output parser). `final_stop_ids`: when generation ends with one of these, it is not text.
    `stop`: stop strings; the text ends before the first one. `add(ids, finished)` returns the text
    that became final; the concatenation of all results is the whole output text.
    """

    def __init__(
        self,
        tokenizer: KimiTokenizer,
        *,
        skip_special_tokens: bool = True,
        keep: Collection[str] = (),
        final_stop_ids: Collection[int] = (),
        stop: Iterable[str] = (),
    ) -> None:
        self._tok = tokenizer
        self._dec = IncrementalDecoder(tokenizer, skip_special_tokens=False)
        self._skip = skip_special_tokens
        self._keep = frozenset(tokenizer.token_to_id(name) for name in keep)
        self._final_stop_ids = frozenset(final_stop_ids)
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._text = ""
        self._sent = 0
        self._stopped = False
        self.stopped_by: str | None = None  # the stop string the text was cut at, if any

    def add(self, token_ids: list[int], finished: bool) -> str:
        if self._stopped:
            return ""
        ids = token_ids
        if finished and ids and ids[-1] in self._final_stop_ids:
            ids = ids[:-1]
        for t in ids:
            if self._skip and self._tok.is_special(t) and t not in self._keep:
                continue
            self._text += self._dec.add(t)
        if finished:
            self._text += self._dec.finish()
        if self._stop:
            begin = max(0, self._sent - self._hold)
            hits = [(i, s) for s in self._stop if (i := self._text.find(s, begin)) >= 0]
            if hits:
                cut, self.stopped_by = min(hits, key=lambda hit: hit[0])
                self._text = self._text[:cut]
                self._stopped = True
        end = (
            len(self._text) if (finished or self._stopped) else max(self._sent, len(self._text) - self._hold)
        )
        delta = self._text[self._sent : end]
        self._sent = end
        return delta

    @property
    def text(self) -> str:
        """All text made final so far."""
        return self._text[: self._sent]
