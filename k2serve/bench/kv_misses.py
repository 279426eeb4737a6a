"""Why a replayed request got fewer cached prompt tokens than the best possible (`bench kv-trace
--trace-misses`): each request's line of the router's --routing-log (`router.backend.routing_record`)
is matched to it by its prompt (`prompt_key`), and the tokens it lost against the best at the same
total capacity are charged to one cause:

- moved: another prefill worker held more of the prompt, settled (its own tiers or the shared store
  as the index had them), than the chosen one could reuse: the routing decision traded it away (its
  reason and both predicted TTFTs are kept);
- moved_from_in_flight: another worker was computing more of the prompt in a prefill in flight (a
  previous turn of the conversation, still running) and the turn went elsewhere;
- in_flight_not_reused: the chosen worker was computing more of the prompt in a prefill in flight, but
  the prefill did not find those blocks (computed in the same step as that prefill, or that prefill
  failed; or, for `kv-settled`, it was not counted and the turn ran beside it);
- store_miss: the index placed the missing blocks in the shared store and the worker did not find
  them there (evicted by the store, or put after the lookup);
- raced: the chosen worker's own tiers held them by the index and the prefill did not find them
  (evicted between the decision and the prefill, or an index a heartbeat late);
- evicted: no worker held them by the index (evicted, or never cached where the best keeps them);
- unrouted: no routing line (a policy that does not score candidates, or a failed request).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from k2serve.loadgen.dataset import BenchRequest
from k2serve.loadgen.record import RequestRecord
from k2serve.router.backend import prompt_key

CAUSES = (
    "moved",
    "moved_from_in_flight",
    "in_flight_not_reused",
    "store_miss",
    "raced",
    "evicted",
    "unrouted",
)


@dataclass(frozen=True)
class Miss:
    """One request that found fewer cached tokens than the best: `lost` = best - found, its cause, and
    a line saying what the router saw (`detail`)."""

    index: int
    best: int
    found: int
    lost: int
    cause: str
    detail: str


def match_routing(requests: Sequence[BenchRequest], lines: Sequence[dict[str, Any]]) -> dict[int, dict]:
    """Request index -> its --routing-log line: lines and requests of the same prompt (`prompt_key`)
    paired in order (requests by index, lines as logged)."""
    by_key: dict[str, list[dict]] = {}
    for line in lines:
        by_key.setdefault(line["prompt"], []).append(line)
    out: dict[int, dict] = {}
    for req in sorted(requests, key=lambda r: r.index):
        queue = by_key.get(prompt_key(req.prompt))
        if queue:
            out[req.index] = queue.pop(0)
    return out


def _fmt(c: dict[str, Any]) -> str:
    """A candidate of a routing line, in short (the queue as counted, then as the worker reported it
    and as the router's own calls make it, when the line has them)."""
    queue = f"queued {c['queued_tokens']}"
    if "reported_queue" in c:
        queue += (
            f" (reported {c['reported_queue']}, router {c['router_queue']}) at {c['tokens_per_s']:.0f} tok/s"
        )
    return (
        f"{c['worker_id']} ttft {c['predicted_ttft_s'] * 1e3:.0f} ms {queue} "
        f"own {c['local']} store {c['shared']} in-flight {c['in_flight']}"
    )


def miss_cause(line: dict[str, Any] | None, found: int) -> tuple[str, str]:
    """(cause, detail) of a request that found `found` cached tokens, fewer than the best, given its
    routing line (None: none matched). See the module doc for the causes."""
    if line is None or not line["candidates"]:
        return "unrouted", "no routing line with candidates"
    cands = {c["worker_id"]: c for c in line["candidates"]}
    chosen = cands[line["worker"]]
    reusable = chosen["local"] + chosen["shared"] + chosen["in_flight"]
    others = [c for c in cands.values() if c is not chosen]
    settled = max(others, key=lambda c: c["local"] + c["shared"], default=None)
    flight = max(others, key=lambda c: c["local"] + c["shared"] + c["in_flight"], default=None)
    head = f"chose {line['reason']}: {_fmt(chosen)}"
    if settled is not None and settled["local"] + settled["shared"] > max(reusable, found):
        return "moved", f"{head}; held settled on {_fmt(settled)}"
    if flight is not None and flight["local"] + flight["shared"] + flight["in_flight"] > max(reusable, found):
        return "moved_from_in_flight", f"{head}; being computed on {_fmt(flight)}"
    if chosen["in_flight"] and found < reusable:
        return "in_flight_not_reused", head
    if chosen["shared"] and found < chosen["local"] + chosen["shared"]:
        return "store_miss", head
    if found < chosen["local"]:
        return "raced", head
    return "evicted", head


def trace_misses(
    requests: Sequence[BenchRequest],
    records: Sequence[RequestRecord],
    best: Sequence[int],
    lines: Sequence[dict[str, Any]],
) -> list[Miss]:
    """Every finished request whose cached tokens fall short of its best (`best`, by request index: the
    best at the same total capacity), with its cause (`miss_cause`)."""
    routing = match_routing(requests, lines)
    out = []
    for r in sorted(records, key=lambda r: r.index):
        found = r.cached_tokens or 0
        if r.ok and found < best[r.index]:
            cause, detail = miss_cause(routing.get(r.index), found)
            out.append(Miss(r.index, best[r.index], found, best[r.index] - found, cause, detail))
    return out


def lost_by_cause(misses: Sequence[Miss]) -> dict[str, int]:
    """Lost tokens per cause (only causes with a loss), in CAUSES order."""
    lost: Counter[str] = Counter()
    for m in misses:
        lost[m.cause] += m.lost
    return {c: lost[c] for c in CAUSES if lost[c]}


def miss_lines(misses: Sequence[Miss]) -> list[str]:
    """One line per miss, for the bench's output."""
    return [
        f"    req {m.index:3d}: best {m.best:5d} found {m.found:5d} lost {m.lost:5d} {m.cause}: {m.detail}"
        for m in misses
    ]
