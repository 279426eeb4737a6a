"""Row-count buckets. oneDNN (torch's CPU GEMM for bf16) builds a kernel per new shape, which costs
milliseconds; padding the rows of a batch to one of a few sizes lets every step reuse kernels."""

from __future__ import annotations


def bucket(n: int) -> int:
    """The smallest bucket >= n: 1, 2, 4, 8, then powers of two and their 1.5x (12, 16, 24, 32, 48, ...)."""
    if n <= 8:
        return 1 if n <= 1 else 1 << (n - 1).bit_length()
    p = 1 << (n - 1).bit_length()  # next power of two
    return p * 3 // 4 if n <= p * 3 // 4 else p
