"""Lease keys of whole-history conversations: requests that resend the whole history with no session id
(the OpenAI SDK, most agent frameworks) still get session leases (issue 18 item 4) on the workers.

A conversation's key is made when one of its requests matched a live prefix in the KV index (its prompt
continues something cached) and is kept, by the chain hash of that request's last full block, for the
next turn: a later prompt that contains that hash continues the same conversation, so it carries the
same key and the worker ends the earlier turn's lease when it arrives (as a session's next turn does).
A turn routed to another prefill worker than the previous one (its queue outweighed the cached prefix)
leaves the previous worker's lease to run out by itself (or give way under pressure).
Pure bookkeeping: hashes in, keys out; bounded (least recently used conversations are forgotten, which
only costs the forgotten conversation its early lease release: its lease still runs out).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

DEFAULT_MAX_CONVERSATIONS = 1 << 16
KEY_PREFIX = "kv-"  # never a chat session id's shape ("sess_..." or a caller's UUID)


class LeaseKeys:
    """Conversation keys by the chain hash of their latest turn's last full block."""

    def __init__(self, max_conversations: int = DEFAULT_MAX_CONVERSATIONS) -> None:
        if max_conversations < 1:
            raise ValueError(f"max_conversations must be >= 1, got {max_conversations}")
        self.max_conversations = max_conversations
        self._by_end: OrderedDict[int, str] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._by_end)

    def key_for(self, hashes: Sequence[int], matched: bool) -> str | None:
        """The lease key of a prompt with chain `hashes` (its full blocks, in order), or None.

        A continuing conversation (some hash is an earlier turn's last) keeps its key; otherwise a
        prompt that `matched` a live prefix in the index starts a conversation keyed by its last hash;
        any other prompt (nothing cached, nothing to continue) gets none. The returned key is then
        remembered under this prompt's last hash, for its next turn."""
        if not hashes:
            return None
        key = None
        for h in reversed(hashes):  # the deepest earlier turn this prompt continues
            key = self._by_end.pop(h, None)
            if key is not None:
                break
        if key is None:
            if not matched:
                return None
            key = f"{KEY_PREFIX}{hashes[-1] & (2**64 - 1):016x}"
        self._by_end[hashes[-1]] = key
        self._by_end.move_to_end(hashes[-1])
        while len(self._by_end) > self.max_conversations:
            self._by_end.popitem(last=False)
        return key
