"""KV-cache transfer between prefill and decode workers (torch.distributed and gRPC backends).

Contract in base.py; pick a backend with registry.make_sender / make_receiver.
"""

from k2serve.transfer.base import (
    ChunkError,
    KVReceiver,
    KVSender,
    TransferError,
    TransferStats,
    TransferTimeout,
)
from k2serve.transfer.registry import BACKENDS, UnknownBackendError, make_receiver, make_sender

__all__ = [
    "BACKENDS",
    "ChunkError",
    "KVReceiver",
    "KVSender",
    "TransferError",
    "TransferStats",
    "TransferTimeout",
    "UnknownBackendError",
    "make_receiver",
    "make_sender",
]
