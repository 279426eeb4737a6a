"""Signatures of Anthropic thinking blocks: HMAC-SHA256 (base64) of the thinking text under a server key.

Anthropic clients (Claude Code) send a reply's thinking blocks back in the next request with their
`signature`; the signature lets the server refuse thinking it did not write (or that was edited) before
the text re-enters the prompt as K2's reasoning. The key is `$K2SERVE_THINKING_KEY` when set, so that
every router replica (and a restarted server) signs and verifies alike; else, on a router, its cluster
token (every replica of a cluster holds the same one; the signed message is domain-separated, so a
signature reveals nothing usable about the token); else 32 random bytes made at startup (`k2serve serve`,
a router authenticated by mutual TLS alone), so signatures from before a restart no longer verify. A block with an empty or absent signature
is accepted (a client that never saw one); a non-empty one must verify.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping

THINKING_KEY_ENV = "K2SERVE_THINKING_KEY"
_DOMAIN = b"k2serve thinking signature v1\x00"  # what is signed is only ever a thinking text


class ThinkingSigner:
    """Signs and verifies thinking texts under `key`."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("the thinking signature key must not be empty")
        self._key = key

    @classmethod
    def from_env(cls, environ: Mapping[str, str], shared_secret: str | None = None) -> ThinkingSigner:
        """The signer of `$K2SERVE_THINKING_KEY` (UTF-8); when it is unset or empty, of `shared_secret` (the
        router's cluster token, which every replica holds), else of a random key."""
        configured = environ.get(THINKING_KEY_ENV, "") or shared_secret or ""
        return cls(configured.encode("utf-8") if configured else secrets.token_bytes(32))

    def sign(self, thinking: str) -> str:
        digest = hmac.new(self._key, _DOMAIN + thinking.encode("utf-8"), hashlib.sha256).digest()
        return base64.b64encode(digest).decode("ascii")

    def verify(self, thinking: str, signature: str) -> bool:
        """Whether `signature` is this server's for `thinking` (compared in constant time)."""
        return hmac.compare_digest(self.sign(thinking).encode("ascii"), signature.encode("utf-8"))
