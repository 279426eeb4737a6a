"""Memory of the router's KV index (k2serve/router/kv_index.py:KVIndex) per block hash, measured with
tracemalloc: N random 64-bit chain hashes stored by one worker (device tier, as events in batches of
a heartbeat's size), then the same hashes stored by a second worker, then half of the first worker's
moved to its host tier (an offload event), then a fresh index with every hash held only in a tier.
Prints bytes per hash for each step as JSON.

    python benchmarks/kv_index_memory.py [--hashes 200000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tracemalloc
from collections.abc import Callable

from k2serve.router.kv_index import KVIndex

BATCH = 1024  # hashes per applied event batch


def _apply(index: KVIndex, worker: str, hashes: list[int], tier: str) -> None:
    for i in range(0, len(hashes), BATCH):
        chunk = hashes[i : i + BATCH]
        index.apply(worker, chunk, [False] * len(chunk), [tier] * len(chunk))


def _grown(step: Callable[[], object]) -> int:
    """Bytes traced memory grew by while `step` ran (its temporaries freed)."""
    before = tracemalloc.get_traced_memory()[0]
    step()
    return tracemalloc.get_traced_memory()[0] - before


def measure(n: int, seed: int = 0) -> dict[str, float]:
    """Bytes per hash of each step (see the module docstring)."""
    rng = random.Random(seed)  # noqa: S311 - synthetic hashes, not a secret
    hashes = [rng.getrandbits(64) for _ in range(n)]  # chain hashes: 64-bit, mostly above 2**62
    tracemalloc.start()
    index = KVIndex(max_blocks=2 * n)
    one = _grown(lambda: _apply(index, "prefill-0", hashes, "device"))
    two = _grown(lambda: _apply(index, "prefill-1", hashes, "device"))
    moved = _grown(lambda: _apply(index, "prefill-0", hashes[: n // 2], "host"))
    tiered = KVIndex(max_blocks=2 * n)
    only_tier = _grown(lambda: _apply(tiered, "prefill-0", hashes, "disk"))
    tracemalloc.stop()
    return {
        "hashes": n,
        "python": sys.version.split()[0],
        "first_holder_B_per_hash": one / n,
        "second_holder_B_per_hash": two / n,
        "offload_half_B_per_hash": moved / n,
        "first_holder_tier_only_B_per_hash": only_tier / n,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hashes", type=int, default=200_000)
    args = ap.parse_args()
    print(json.dumps(measure(args.hashes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
