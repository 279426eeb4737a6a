"""The KV-transfer contract: errors, the transfer description, and the sender / receiver interfaces.

A transfer moves one request's latent KV, `num_layers` tensors of shape [num_tokens, kv_dim], from a
prefill worker (KVSender) to a decode worker (KVReceiver). The decode worker calls `expect` first
(when it reserves blocks), the prefill worker then `open`s, sends every layer once and `close`s.
Every chunk on the wire is a KVChunkHeader protobuf plus raw tensor bytes, checked on arrival
against the expected transfer and by a checksum of the bytes (checksum.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

MAX_TRANSFER_ID_CHARS = 64

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "uint8": torch.uint8,  # raw rows of a quantised cache (the fp8 latent rows of kvcache/fp8.py)
}
"""Wire dtype names (KVChunkHeader.dtype) and the dtypes they stand for; nothing else is accepted."""

OnLayer = Callable[[int, torch.Tensor], None]
"""on_layer(layer, kv[num_tokens, kv_dim]): kv is only valid during the call (copy it out)."""

Place = Callable[[int], "torch.Tensor | None"]
"""place(layer) -> where that layer's KV belongs: a contiguous [num_tokens, kv_dim] tensor of the
transfer's dtype on the receiver's device, which the backend may receive the layer's bytes into
directly (no copy through on_layer), or None to deliver the layer through on_layer."""


class TransferError(RuntimeError):
    """A transfer failed; carries its id and the reason."""

    def __init__(self, transfer_id: str, reason: str) -> None:
        super().__init__(f"transfer {transfer_id!r}: {reason}")
        self.transfer_id = transfer_id
        self.reason = reason


class ChunkError(TransferError):
    """A chunk failed validation: `field` had value `got` where `expected` was required."""

    def __init__(self, transfer_id: str, field: str, got: object, expected: object) -> None:
        super().__init__(transfer_id, f"bad chunk: {field} is {got!r}, expected {expected}")
        self.field = field
        self.got = got
        self.expected = expected


class TransferTimeout(TransferError):
    """The transfer did not complete within timeout_s seconds."""

    def __init__(self, transfer_id: str, timeout_s: float, detail: str = "") -> None:
        super().__init__(transfer_id, f"timed out after {timeout_s:.3g} s{': ' + detail if detail else ''}")
        self.timeout_s = timeout_s


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of dtype; raises ValueError for dtypes not in DTYPES."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} not supported for KV transfer; use one of {sorted(DTYPES)}")


def as_bytes_view(kv: torch.Tensor) -> torch.Tensor:
    """kv as a flat contiguous uint8 tensor sharing its memory when kv is already contiguous."""
    return kv.contiguous().reshape(-1).view(torch.uint8)


@dataclass(frozen=True)
class TransferSpec:
    """What one transfer carries: num_layers tensors [num_tokens, kv_dim] of dtype."""

    transfer_id: str
    num_layers: int
    num_tokens: int
    kv_dim: int
    dtype: torch.dtype
    traceparent: str = ""  # the sender's span (W3C), carried in the chunk headers; "" when not traced

    def __post_init__(self) -> None:
        tid = self.transfer_id
        if not tid or len(tid) > MAX_TRANSFER_ID_CHARS or not tid.isascii() or not tid.isprintable():
            raise ValueError(f"transfer_id {tid!r} must be 1..{MAX_TRANSFER_ID_CHARS} printable ASCII chars")
        for name in ("num_layers", "num_tokens", "kv_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        dtype_name(self.dtype)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's KV in one layer."""
        return self.kv_dim * self.dtype.itemsize

    @property
    def layer_bytes(self) -> int:
        return self.num_tokens * self.row_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.layer_bytes


@dataclass(frozen=True)
class TransferStats:
    """bytes: payload bytes moved (headers excluded); seconds: wall time of the transfer (see each method).
    Receivers also give: finished_at, the `time.perf_counter()` of the last layer's arrival;
    verify_seconds, the time spent checksumming; traceparent, the sender's span; via_grpc, whether
    the chunks came over gRPC (a torch receiver's gRPC fallback included)."""

    bytes: int
    seconds: float
    finished_at: float = 0.0
    verify_seconds: float = 0.0
    traceparent: str = ""
    via_grpc: bool = False

    @property
    def gbps(self) -> float:
        """Payload throughput in GB/s (1e9 bytes per second)."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


class KVSender(ABC):
    """Sends transfers to one receiver endpoint (a prefill worker keeps one sender per decode endpoint).

    Contract:
    - `open` before any `send_layer` of that transfer_id; each layer in [0, num_layers) is sent
      exactly once, in any order; `close` once after the last layer.
    - `send_layer` may return before the bytes are on the wire, so the caller computes layer i+1
      meanwhile. The caller must not modify `kv` until the returned future is done. The future
      fails with TransferError when that layer could not be sent.
    - `close(timeout)` returns once the receiver has acknowledged every layer as verified, and
      raises TransferError when the receiver rejected the transfer, the connection failed, or
      (TransferTimeout) timeout seconds passed. It also raises if a layer was never sent.
    - Methods are thread-safe across different transfer ids; `shutdown` releases connections.
    """

    @abstractmethod
    def open(
        self,
        transfer_id: str,
        num_layers: int,
        num_tokens: int,
        kv_dim: int,
        dtype: torch.dtype,
        traceparent: str = "",
    ) -> None:
        """Start a transfer; raises ValueError for a bad description or a transfer_id already open.
        traceparent: the sender's span, handed to the receiver in the chunk headers."""

    @abstractmethod
    def send_layer(self, transfer_id: str, layer: int, kv: torch.Tensor) -> Future[None]:
        """Queue kv [num_tokens, kv_dim] of `layer`; raises ValueError for a wrong shape, dtype or layer."""

    @abstractmethod
    def close(self, transfer_id: str, timeout: float) -> TransferStats:
        """Wait up to timeout seconds for the acknowledgement; TransferStats.seconds runs from open."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release connections and threads; open transfers fail. Idempotent."""

    @property
    def broken(self) -> str | None:
        """Why this sender can send nothing more (its connection was lost, the receiver said
        goodbye, or it was shut down), else None: the owner then replaces it with a new one."""
        return None


class KVReceiver(ABC):
    """Receives transfers into callbacks (a decode worker has one receiver per backend).

    Contract:
    - `endpoint` is the "host:port" address senders are given (KVEndpoint.address).
    - `expect` registers a transfer before its first chunk can arrive; chunks of unknown
      transfer ids are rejected back to their sender.
    - `on_layer(layer, kv)` runs on a receiver thread once per layer, after the layer's bytes
      are complete and verified; kv [num_tokens, kv_dim] is only valid during the call. An
      exception from on_layer fails the transfer.
    - With `place`, a backend that can receive into memory directly (torch: gloo and NCCL) puts a
      layer's bytes straight into `place(layer)` and verifies them there; on_layer is then not
      called for that layer. Backends that cannot (gRPC) ignore `place`. The placed memory holds
      unverified bytes until `wait` returns; after a failed transfer it holds garbage.
      `wait` and `cancel` return only once no payload can still land in it (a payload already
      on its way finishes first, or its connection breaks), so the caller may then reuse it.
    - A bad chunk (sizes, layer, dtype, order, checksum) fails only its transfer, with a
      ChunkError naming the field; the receiver keeps serving other transfers.
    - Every `expect` ends with `wait` or `cancel`. `wait(timeout)` returns TransferStats
      (seconds from the first chunk to the last layer) or raises TransferError (TransferTimeout
      after timeout seconds; the transfer is then dropped and late chunks are rejected).
    """

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """The "host:port" senders connect to."""

    @abstractmethod
    def expect(
        self,
        transfer_id: str,
        num_layers: int,
        num_tokens: int,
        kv_dim: int,
        dtype: torch.dtype,
        on_layer: OnLayer,
        place: Place | None = None,
    ) -> None:
        """Register a transfer; raises ValueError for a bad description or a transfer_id already expected."""

    @abstractmethod
    def wait(self, transfer_id: str, timeout: float) -> TransferStats:
        """Block until every layer was delivered, up to timeout seconds."""

    @abstractmethod
    def cancel(self, transfer_id: str) -> bool:
        """Drop a transfer (no more on_layer calls after in-flight ones); False when it was unknown."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop serving; pending transfers fail. Idempotent."""
