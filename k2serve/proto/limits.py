"""Message-size limits for every gRPC server and channel, in bytes; the one place they are set.

Control-plane calls carry prompts and token lists (a 262,144-token prompt is ~1.3 MB of varints,
its text a few MB); KV transfer carries raw tensor bytes in chunks of at most KV_CHUNK_MAX_BYTES
(one K2 layer of 4,096 tokens is 4.7 MB in bf16), so its channels allow a chunk plus header slack.
"""

from __future__ import annotations

MiB = 1 << 20

CONTROL_MAX_MESSAGE_BYTES = 64 * MiB
"""max_receive/send_message_length of the router's and workers' control-plane servers and channels."""

KV_CHUNK_MAX_BYTES = 16 * MiB
"""Largest raw payload in one KVChunk; bigger layers are split along tokens."""

KV_MAX_MESSAGE_BYTES = KV_CHUNK_MAX_BYTES + 1 * MiB
"""max_receive/send_message_length of KV-transfer channels and of servers hosting KVTransfer."""


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Server or channel options that raise both message-size limits to max_message_bytes."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


# gRPC waits up to 120 s between reconnection attempts by default: a worker or router that comes back
# after a link cut or a restart would sit unused that long. Cluster peers retry within 2 s instead.
RECONNECT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
