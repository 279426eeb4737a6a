"""The payload checksum of every KV chunk: a Fletcher-style pair of 64-bit sums.

Definition: pad the payload with zero bytes to whole little-endian uint64 words w_0 .. w_{m-1};
    sum      = sum(w_i)            mod 2**64
    weighted = sum((i + 1) * w_i)  mod 2**64
`sum` alone catches any change confined to one word and any truncation that leaves stale bytes;
`weighted` catches words swapped or shifted within the payload (a transposition of w_i and w_j
changes it by (j - i) * (w_i - w_j)).

Why not CRC-32: measured on one core of the 2-core test machine for a 4.7 MB layer, zlib.crc32 runs
at 4.6-5 GB/s (adler32 3.4, sha1 2.0, blake2b 0.95, md5 0.8) while these two sums take two
memory-bound numpy reductions at ~11 GB/s together (0.42 ms vs 0.94 ms per layer). Every byte is
checked twice (sender and receiver) on the same cores that copy it through the socket, so the
checksum sets most of the gap to a raw socket. The sums are plain integer reductions, so a CUDA
tensor is checked on its device with torch (no copy to the host), with the same result.
"""

from __future__ import annotations

import numpy as np
import torch

MASK = (1 << 64) - 1
ROW_WORDS = 512  # words per row of the two-pass (row sums, column sums) reduction
Checksum = tuple[int, int]


def checksum_reference(data: bytes) -> Checksum:
    """The definition, word by word in Python (slow; the reference for tests)."""
    padded = data + bytes(-len(data) % 8)
    total = weighted = 0
    for i in range(len(padded) // 8):
        word = int.from_bytes(padded[8 * i : 8 * i + 8], "little")
        total += word
        weighted += (i + 1) * word
    return total & MASK, weighted & MASK


def _numpy(buf: np.ndarray) -> Checksum:
    # Word (r, c) of the [rows, ROW_WORDS] view has position r * ROW_WORDS + c, so
    # weighted = ROW_WORDS * sum(r * rowsum_r) + sum((c + 1) * colsum_c). uint64 arrays wrap mod 2**64.
    n = buf.size
    full = n // (8 * ROW_WORDS)
    words = buf[: full * 8 * ROW_WORDS].view(np.uint64).reshape(full, ROW_WORDS)
    tail = np.zeros(ROW_WORDS, dtype=np.uint64)
    tail.view(np.uint8)[: n - full * 8 * ROW_WORDS] = buf[full * 8 * ROW_WORDS :]
    rows = np.append(words.sum(axis=1, dtype=np.uint64), tail.sum(dtype=np.uint64))
    cols = words.sum(axis=0, dtype=np.uint64) + tail
    row_weighted = int((rows * np.arange(rows.size, dtype=np.uint64)).sum(dtype=np.uint64))
    col_weighted = int((cols * np.arange(1, ROW_WORDS + 1, dtype=np.uint64)).sum(dtype=np.uint64))
    return int(rows.sum(dtype=np.uint64)), (ROW_WORDS * row_weighted + col_weighted) & MASK


def _torch(flat: torch.Tensor) -> Checksum:
    # As _numpy, on the tensor's device; int64 arithmetic wraps like uint64.
    n = flat.numel()
    padded = torch.zeros(-(-n // (8 * ROW_WORDS)) * ROW_WORDS, dtype=torch.int64, device=flat.device)
    padded.view(torch.uint8)[:n] = flat
    words = padded.view(-1, ROW_WORDS)
    rows, cols = words.sum(dim=1), words.sum(dim=0)
    row_idx = torch.arange(rows.numel(), dtype=torch.int64, device=flat.device)
    col_idx = torch.arange(1, ROW_WORDS + 1, dtype=torch.int64, device=flat.device)
    row_weighted = int((rows * row_idx).sum().item()) & MASK
    col_weighted = int((cols * col_idx).sum().item()) & MASK
    return int(rows.sum().item()) & MASK, (ROW_WORDS * row_weighted + col_weighted) & MASK


def checksum(data: bytes | memoryview | torch.Tensor) -> Checksum:
    """(sum, weighted) of raw bytes or of a tensor's bytes (CUDA tensors are summed on the device)."""
    if isinstance(data, torch.Tensor):
        flat = data.detach().contiguous().reshape(-1).view(torch.uint8)
        if flat.device.type != "cpu":
            return _torch(flat)
        return _numpy(flat.numpy())
    return _numpy(np.frombuffer(data, dtype=np.uint8))
