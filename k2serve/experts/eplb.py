"""EPLB: per-expert load counters and the placement planner (decision only; `reshard` applies it).

Load is counted as routed (token, slot) pairs per MoE layer and global expert id, on each rank for
the tokens it routed; the group's total is one all_reduce away. The planner follows DeepSeek's
EPLB idea: give the hottest experts redundant replicas (each replica then carries load / replicas),
then pack the replicas onto ranks with greedy longest-processing-time, never two copies of one
expert on a rank, filling each rank to exactly its slot count. It is a pure function: every rank
computes the same placement from the same summed counts.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from k2serve.experts.comm import EPComm, EPConfigError
from k2serve.experts.placement import ExpertPlacement, PlacementError


@dataclass(frozen=True)
class EPLBConfig:
    """EPLB while serving, with vLLM's `--eplb-config` keys: every `step_interval` group steps (steps
    in which some rank had work) the group re-places the experts from the load routed over the last
    `window_size` such steps; `num_redundant_experts` extra replica slots over the whole group (vLLM
    counts them globally: each of the R ranks gets num_redundant_experts / R, so R must divide it).
    The window keeps one count per MoE layer and expert per step on every rank (int32: 92 KB a step
    for K2, 92 MB for vLLM's default 1000 steps)."""

    window_size: int = 1000
    step_interval: int = 3000
    num_redundant_experts: int = 0

    def __post_init__(self) -> None:
        for name in ("window_size", "step_interval"):
            if getattr(self, name) < 1:
                raise EPConfigError(f"--eplb-config {name} must be >= 1", getattr(self, name))
        if self.num_redundant_experts < 0:
            raise EPConfigError(
                "--eplb-config num_redundant_experts must be >= 0", self.num_redundant_experts
            )

    @classmethod
    def from_json(cls, text: str) -> EPLBConfig:
        """Parse `--eplb-config` ('{"window_size": 1000, "step_interval": 3000, ...}'; missing keys keep
        their defaults). Unknown keys and non-integers are errors that name them."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise EPConfigError(f"--eplb-config is not JSON ({e.msg})", text) from None
        if not isinstance(raw, dict):
            raise EPConfigError("--eplb-config must be a JSON object", text)
        known = ("window_size", "step_interval", "num_redundant_experts")
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise EPConfigError(f"--eplb-config keys must be among {list(known)}; unknown", unknown)
        bad = {k: v for k, v in raw.items() if not isinstance(v, int) or isinstance(v, bool)}
        if bad:
            raise EPConfigError("--eplb-config values must be integers", bad)
        return cls(**raw)

    def to_json(self) -> str:
        """The `--eplb-config` value that parses back to this config (launchers pass it on)."""
        return json.dumps(
            {
                "window_size": self.window_size,
                "step_interval": self.step_interval,
                "num_redundant_experts": self.num_redundant_experts,
            },
            separators=(",", ":"),
        )

    def redundant_per_rank(self, world_size: int) -> int:
        """Replica slots per rank; num_redundant_experts must split evenly over the group."""
        if self.num_redundant_experts % world_size:
            raise EPConfigError(
                f"--eplb-config num_redundant_experts must be a multiple of the EP size {world_size}",
                self.num_redundant_experts,
            )
        return self.num_redundant_experts // world_size


class ExpertLoad:
    """Routed (token, slot) counts per MoE layer and global expert id: `counts` int64 [L, E] since the
    last `reset` (what the imbalance metric reads), and the counts of the current step, which
    `end_step` moves into a sliding window of the last `window_size` steps (what EPLB plans from;
    None: every step since the start, keeping only the sum). The counts live on `device`, the
    routing's (counting there costs no host sync per layer); the group sums come back on the host."""

    def __init__(
        self,
        num_moe_layers: int,
        n_experts: int,
        window_size: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if window_size is not None and window_size < 1:
            raise EPConfigError("the load window must be >= 1 step", window_size)
        self.counts = torch.zeros(num_moe_layers, n_experts, dtype=torch.long, device=device)
        self._step = torch.zeros_like(self.counts)
        self._window: deque[torch.Tensor] = deque()
        self._window_size = window_size
        self.window = torch.zeros_like(self.counts)  # sum of the steps in the window

    def record(self, moe_index: int, ids: torch.Tensor) -> None:
        """ids: global expert ids of any shape, counted once per element."""
        counts = torch.bincount(ids.flatten(), minlength=self.counts.shape[1])
        self.counts[moe_index] += counts
        self._step[moe_index] += counts

    def end_step(self) -> None:
        """Close the current step: it enters the window, and the oldest step leaves a full window.
        Steps with no tokens of this rank count too (the window is the same steps on every rank)."""
        self.window += self._step
        if self._window_size is not None:  # int32 per step: K2's 60 x 384 counts are 92 KB a step
            self._window.append(self._step.to(torch.int32))
            if len(self._window) > self._window_size:
                self.window -= self._window.popleft()
        self._step.zero_()

    def reset(self) -> None:
        """Zero `counts` (a re-placement starts a new measurement); the window keeps its history."""
        self.counts.zero_()

    def global_counts(self, comm: EPComm) -> torch.Tensor:
        """The group's summed counts [L, E]. A collective: every rank calls it between the same steps."""
        total = self.counts.clone()
        comm.all_reduce(total, "sum", "expert load sum")
        return total.cpu()

    def global_window(self, comm: EPComm) -> torch.Tensor:
        """The group's summed window counts [L, E]; a collective, as `global_counts`."""
        total = self.window.clone()
        comm.all_reduce(total, "sum", "expert load window sum")
        return total.cpu()


def rank_loads(placement: ExpertPlacement, load: torch.Tensor) -> torch.Tensor:
    """Expected load per rank [W] (float64) when each expert's load [E] is spread evenly over its replicas."""
    per_replica = load.double() / torch.tensor(
        [len(placement.holders(e)) for e in range(placement.n_experts)]
    )
    return torch.stack([per_replica[list(ids)].sum() for ids in placement.slots])


def imbalance(placement: ExpertPlacement, load: torch.Tensor) -> float:
    """Max / mean of the per-rank loads `rank_loads` gives (1.0 = balanced; 1.0 when there is no load)."""
    loads = rank_loads(placement, load)
    mean = float(loads.mean())
    return float(loads.max()) / mean if mean else 1.0


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
