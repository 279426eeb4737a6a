"""Mutual authentication of every connection of a torch KV-transfer pair, with the cluster token.

Why: the pair meets through the receiver's TCPStore, and a TCPStore serves any client that reaches
its port (get, set, add, wait, delete and `list_keys` of every key; no credential). So nothing read
from it is trusted: an attacker could rewrite the gloo addresses or the NCCL unique id a pair
rendezvouses with, and so sit at the other end of a connection, or change the receiver's published
device and chunk size. Before a byte of KV flows, each connection of the pair (the gloo control
connection, then the payload connection: gloo on CPU, NCCL on CUDA) runs this exchange over itself:

1. rank 0 (the receiver) sends a fresh 32-byte random nonce, rank 1 (the sender) answers with its own;
2. each side sends HMAC-SHA256(key, role | transcript) and checks the other's with
   `hmac.compare_digest`, where key = HMAC-SHA256(cluster token, KEY_LABEL), role is the sender's
   rank, and the transcript binds the connection (its label and peer number), both nonces and the
   receiver's published parameters (payload device type and max_chunk_bytes, as the sender read them
   from the store and as the receiver set them: a rewritten value fails the check).

A side without the token (or with another one) fails on both ends at once (each verifies
independently; neither waits on a proof that will not come), so a forged receiver never gets KV and a
forged sender never lands any. Fresh nonces on both sides stop a replayed proof; the role in the MAC
stops a reflected one. The tensors live on the connection's device (NCCL moves CUDA tensors only);
rank 0 sends before it receives and rank 1 the reverse, because NCCL point-to-point operations of
one communicator run in order on one stream (both receiving first would deadlock).

What it does not do: encrypt (torch.distributed has no TLS: the KV crosses in plaintext, so the
cluster refuses this backend with --tls-*), or stop a client of the store from disrupting a
rendezvous (a denial of service: keep the transfer port inside the cluster's network policy).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

import torch
import torch.distributed as dist

KEY_LABEL = b"k2serve kv-transfer pair v1"
NONCE_BYTES = 32
MAC_BYTES = 32
HANDSHAKE_TAG = 7  # a tag no other message of the pair uses


class HandshakeError(ConnectionError):
    """A pair connection failed its authentication: `label` names the connection, `reason` why."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(f"KV transfer connection {label!r} refused: {reason}")
        self.label = label
        self.reason = reason


def pair_key(token: str | None) -> bytes:
    """The MAC key of every pair, derived from the cluster token (domain-separated from its use as a
    gRPC credential). No token (--insecure-internal): a fixed key, so any peer passes, as the rest of
    the cluster's internal calls do then."""
    return hmac.new((token or "").encode(), KEY_LABEL, hashlib.sha256).digest()


def transcript(label: str, peer: int, device_type: str, max_chunk_bytes: int, n0: bytes, n1: bytes) -> bytes:
    """What both sides' proofs cover (see the module docstring)."""
    head = f"{label}|{peer}|{device_type}|{max_chunk_bytes}|".encode()
    return head + n0 + n1


def proof(key: bytes, rank: int, text: bytes) -> bytes:
    """The MAC rank `rank` sends over `text`."""
    return hmac.new(key, b"rank%d|" % rank + text, hashlib.sha256).digest()


def _exchange(
    pg: dist.ProcessGroup, rank: int, mine: bytes, device: torch.device, timeout: timedelta
) -> bytes:
    """Send `mine`, receive as many bytes from the other rank (rank 0 sends first)."""
    out = torch.tensor(list(mine), dtype=torch.uint8, device=device)
    got = torch.zeros(len(mine), dtype=torch.uint8, device=device)
    peer = 1 - rank
    steps = [("send", out), ("recv", got)] if rank == 0 else [("recv", got), ("send", out)]
    for op, t in steps:
        work = (pg.send if op == "send" else pg.recv)([t], peer, HANDSHAKE_TAG)
        work.wait(timeout)
    return bytes(got.cpu().tolist())


def authenticate(
    pg: dist.ProcessGroup,
    rank: int,
    key: bytes,
    label: str,
    peer: int,
    device_type: str,
    max_chunk_bytes: int,
    device: torch.device,
    timeout_s: float,
) -> None:
    """Run the exchange over `pg` as `rank`; returns once the other side proved the key, raises
    HandshakeError when it did not (or when it went silent for timeout_s or dropped the connection)."""
    timeout = timedelta(seconds=timeout_s)
    nonce = secrets.token_bytes(NONCE_BYTES)
    try:
        theirs = _exchange(pg, rank, nonce, device, timeout)
        n0, n1 = (nonce, theirs) if rank == 0 else (theirs, nonce)
        text = transcript(label, peer, device_type, max_chunk_bytes, n0, n1)
        claimed = _exchange(pg, rank, proof(key, rank, text), device, timeout)
    except RuntimeError as e:  # gloo / NCCL: timed out or the connection closed
        raise HandshakeError(label, f"no proof from the other side: {str(e).splitlines()[0][:200]}") from e
    if not hmac.compare_digest(claimed, proof(key, 1 - rank, text)):
        raise HandshakeError(
            label,
            "the other side does not hold this cluster's token, or the rendezvous values in the "
            "TCPStore were rewritten",
        )
