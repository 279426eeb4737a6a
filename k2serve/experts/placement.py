"""Expert placement: which global routed experts each expert-parallel rank holds, per MoE layer.

A placement is plain data (no process group): `slots[r]` lists the global expert ids rank r holds,
in the order of its local stacked weights. An expert held by several ranks has redundant replicas
with identical weights; the dispatcher spreads its tokens over them by token index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class PlacementError(ValueError):
    """A placement is inconsistent (an expert unplaced, held twice by one rank, an id out of range)."""

    def __init__(self, message: str, value: object) -> None:
        super().__init__(f"{message}: {value!r}")
        self.value = value


@dataclass(frozen=True)
class DispatchTables:
    """Lookup tables for choosing a replica: replica j of expert e is local slot `local[e, j]` of rank
    `rank[e, j]`, for j < `count[e]` (padding repeats replica 0)."""

    rank: torch.Tensor  # [E, Rmax] int64
    local: torch.Tensor  # [E, Rmax] int64
    count: torch.Tensor  # [E] int64, >= 1


@dataclass(frozen=True)
class ExpertPlacement:
    """Where the routed experts of one MoE layer live.

    `slots[r]` = the global expert ids rank r holds, in local order (local slot i holds `slots[r][i]`).
    Invariants (checked): every id in [0, n_experts) is held by at least one rank; a rank holds an
    expert at most once; every rank has at least one slot.
    """

    n_experts: int
    slots: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "slots", tuple(tuple(int(e) for e in s) for s in self.slots))
        if self.n_experts < 1:
            raise PlacementError("n_experts must be >= 1", self.n_experts)
        if not self.slots:
            raise PlacementError("a placement needs at least one rank", self.slots)
        held: set[int] = set()
        for r, ids in enumerate(self.slots):
            if not ids:
                raise PlacementError(f"rank {r} holds no expert", ids)
            if len(set(ids)) != len(ids):
                raise PlacementError(f"rank {r} holds an expert twice", ids)
            bad = [e for e in ids if not 0 <= e < self.n_experts]
            if bad:
                raise PlacementError(f"rank {r} holds expert ids outside [0, {self.n_experts})", bad)
            held.update(ids)
        missing = sorted(set(range(self.n_experts)) - held)
        if missing:
            raise PlacementError("experts held by no rank", missing)

    @classmethod
    def contiguous(cls, n_experts: int, world_size: int, redundant_per_rank: int = 0) -> ExpertPlacement:
        """Contiguous near-equal shares (rank r holds a block of ids, the first n % W ranks one more),
        then `redundant_per_rank` replicas per rank of the experts that follow its share (wrapping)."""
        if world_size < 1 or world_size > n_experts:
            raise PlacementError(f"world_size must be in [1, n_experts={n_experts}]", world_size)
        base, extra = divmod(n_experts, world_size)
        slots: list[tuple[int, ...]] = []
        start = 0
        for r in range(world_size):
            share = list(range(start, start + base + (r < extra)))
            start += len(share)
            if redundant_per_rank > n_experts - len(share):
                raise PlacementError(
                    f"rank {r} holds {len(share)} of {n_experts} experts; too few left to replicate",
                    redundant_per_rank,
                )
            share += [(start + j) % n_experts for j in range(redundant_per_rank)]
            slots.append(tuple(share))
        return cls(n_experts, tuple(slots))

    @property
    def world_size(self) -> int:
        return len(self.slots)

    def owned(self, rank: int) -> tuple[int, ...]:
        """Global ids rank `rank` holds, in local order (what it passes to `load_model(expert_ids=...)`)."""
        return self.slots[rank]

    def holder_map(self) -> dict[int, tuple[int, ...]]:
        """global expert id -> the ranks holding it, ascending."""
        out: dict[int, list[int]] = {e: [] for e in range(self.n_experts)}
        for r, ids in enumerate(self.slots):
            for e in ids:
                out[e].append(r)
        return {e: tuple(rs) for e, rs in out.items()}

    def holders(self, expert: int) -> tuple[int, ...]:
        return self.holder_map()[expert]

    def dispatch_tables(self) -> DispatchTables:
        """Replica tables, replicas of each expert ordered by rank (deterministic on every rank)."""
        reps: list[list[tuple[int, int]]] = [[] for _ in range(self.n_experts)]
        for r, ids in enumerate(self.slots):
            for i, e in enumerate(ids):
                reps[e].append((r, i))
        width = max(len(x) for x in reps)
        rank = torch.tensor(
            [[p[0] for p in x] + [x[0][0]] * (width - len(x)) for x in reps], dtype=torch.long
        )
        local = torch.tensor(
            [[p[1] for p in x] + [x[0][1]] * (width - len(x)) for x in reps], dtype=torch.long
        )
        return DispatchTables(rank, local, torch.tensor([len(x) for x in reps], dtype=torch.long))
