"""EPLB: per-expert load counters and the placement planner (decision only; `reshard` applies it).

Load is counted as routed (token, slot) pairs per MoE layer and global expert id, on each rank for
the tokens it routed; the group's total is one all_reduce away. The planner follows DeepSeek's
EPLB idea: give the hottest experts redundant replicas (each replica then carries load / replicas),
then pack the replicas onto ranks with greedy longest-processing-time, never two copies of one
expert on a rank, filling each rank to exactly its slot count. It is a pure function: every rank
computes the same placement from the same summed counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from k2serve.experts.comm import EPComm
from k2serve.experts.placement import ExpertPlacement, PlacementError


class ExpertLoad:
    """Routed (token, slot) counts since the last `reset`: `counts` int64 [num_moe_layers, n_experts]."""

    def __init__(self, num_moe_layers: int, n_experts: int) -> None:
        self.counts = torch.zeros(num_moe_layers, n_experts, dtype=torch.long)

    def record(self, moe_index: int, ids: torch.Tensor) -> None:
        """ids: global expert ids of any shape, counted once per element."""
        self.counts[moe_index] += torch.bincount(ids.flatten(), minlength=self.counts.shape[1])

    def reset(self) -> None:
        self.counts.zero_()

    def global_counts(self, comm: EPComm) -> torch.Tensor:
        """The group's summed counts [L, E]. A collective: every rank calls it between the same steps."""
        total = self.counts.clone()
        comm.all_reduce(total, "sum", "expert load sum")
        return total


def rank_loads(placement: ExpertPlacement, load: torch.Tensor) -> torch.Tensor:
    """Expected load per rank [W] (float64) when each expert's load [E] is spread evenly over its replicas."""
    per_replica = load.double() / torch.tensor(
        [len(placement.holders(e)) for e in range(placement.n_experts)]
    )
    return torch.stack([per_replica[list(ids)].sum() for ids in placement.slots])


def replicate(load: Sequence[float], num_slots: int, max_replicas: int) -> list[int]:
    """Replica count per expert (>= 1, <= max_replicas, summing to num_slots): each extra slot goes to
    the expert with the highest load per replica (ties: lowest id)."""
    n = len(load)
    if not n <= num_slots <= n * max_replicas:
        raise PlacementError(f"slot count must be in [{n}, {n * max_replicas}] for {n} experts", num_slots)
    reps = [1] * n
    for _ in range(num_slots - n):
        e = max((e for e in range(n) if reps[e] < max_replicas), key=lambda e: (load[e] / reps[e], -e))
        reps[e] += 1
    return reps


def plan_placement(load: torch.Tensor, capacities: Sequence[int]) -> ExpertPlacement:
    """Placement of one layer: load [E] (counts, any non-negative numbers), capacities[r] = slots of
    rank r (sum >= E). Replicates hot experts into the spare slots, then packs replicas heaviest first,
    each onto the least loaded rank that has a free slot and no copy of it (ties: lowest rank)."""
    world, n = len(capacities), int(load.numel())
    if world < 1 or min(capacities) < 1:
        raise PlacementError("every rank needs at least one slot", list(capacities))
    values = [float(v) for v in load.double().tolist()]
    if min(values, default=0.0) < 0:
        raise PlacementError("expert load must be non-negative", min(values))
    reps = replicate(values, sum(capacities), world)
    items = sorted(
        ((values[e] / reps[e], e) for e in range(n) for _ in range(reps[e])), key=lambda t: (-t[0], t[1])
    )
    slots: list[list[int]] = [[] for _ in range(world)]
    loads = [0.0] * world
    for w, e in items:
        free = [r for r in range(world) if len(slots[r]) < capacities[r] and e not in slots[r]]
        if not free:
            free = [_make_room(slots, capacities, loads, values, reps, e)]
        r = min(free, key=lambda r: (loads[r], r))
        slots[r].append(e)
        loads[r] += w
    return ExpertPlacement(n, tuple(tuple(s) for s in slots))


def _make_room(
    slots: list[list[int]],
    capacities: Sequence[int],
    loads: list[float],
    values: list[float],
    reps: list[int],
    e: int,
) -> int:
    """Every rank with a free slot already holds e: move an expert x from a full rank q that lacks e to
    a rank p with a free slot that lacks x, and return q (now with a free slot). With equal capacities
    such a move always exists (q holds more experts than p, so one of them is not on p)."""
    world = len(slots)
    for p in (r for r in range(world) if len(slots[r]) < capacities[r]):
        for q in (r for r in range(world) if e not in slots[r] and len(slots[r]) == capacities[r]):
            moved = next((x for x in slots[q] if x not in slots[p]), None)
            if moved is None:
                continue
            slots[q].remove(moved)
            slots[p].append(moved)
            w = values[moved] / reps[moved]
            loads[q] -= w
            loads[p] += w
            return q
    raise PlacementError(f"no rank can take a copy of expert {e}", [list(s) for s in slots])
