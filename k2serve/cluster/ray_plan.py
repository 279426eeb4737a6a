"""What runs where on a Ray cluster: the placement groups of a k2serve cluster, decided without Ray.

One placement group per *group* of processes that must be placed together:

- `router`: one bundle (the router, and the embedded Redis beside it);
- each prefill / decode worker: one bundle per expert-parallel rank (`ep_size` bundles, one process
  each). The ranks of one group step in lockstep and exchange tokens every layer, so they are packed:
  `STRICT_PACK` (one node; the default) or `PACK` (as few nodes as possible, for groups larger than
  a node). Across groups the plan spreads: worker group i gets a soft target node, round-robin over
  the nodes whose total resources can hold the whole group (`STRICT_PACK` only; Ray falls back to any
  node with room when the target is full or gone).

Kept apart from the code that applies it (`ray_runtime`) so it is tested on CPU without Ray.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from k2serve.cluster.local import ClusterSpec

STRATEGIES = ("STRICT_PACK", "PACK")
WORKER_ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class RayOptions:
    """How a k2serve cluster uses Ray.

    rank_resources: Ray resources of one worker process (one EP rank), e.g. {"CPU": 4, "GPU": 1};
    the process sees only the GPUs Ray assigned (CUDA_VISIBLE_DEVICES). router_resources: the router's.
    Both need CPU > 0 (a bundle cannot be empty). group_strategy: how the ranks of one EP group are
    packed. spread_groups: give worker groups round-robin soft target nodes. max_restarts: how often
    Ray restarts a process's actor after it or its process died (-1: without limit); a restarted
    worker registers with the router again by itself. namespace: the Ray namespace of the actors.
    placement_timeout_s: seconds to wait for the placement groups before reporting what is missing.
    """

    rank_resources: Mapping[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    router_resources: Mapping[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    group_strategy: str = "STRICT_PACK"
    spread_groups: bool = True
    max_restarts: int = 3
    namespace: str = "k2serve"
    placement_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for what, res in (
            ("rank_resources", self.rank_resources),
            ("router_resources", self.router_resources),
        ):
            if res.get("CPU", 0) <= 0:
                raise ValueError(f"{what} needs CPU > 0 (a Ray bundle cannot be empty), got {dict(res)}")
            bad = {k: v for k, v in res.items() if v < 0}
            if bad:
                raise ValueError(f"{what}: resources must be >= 0, got {bad}")
            object.__setattr__(self, what, MappingProxyType({k: float(v) for k, v in res.items()}))
        if self.group_strategy not in STRATEGIES:
            raise ValueError(f"group_strategy must be one of {STRATEGIES}, got {self.group_strategy!r}")
        if self.max_restarts < -1:
            raise ValueError(f"max_restarts must be >= -1 (-1: without limit), got {self.max_restarts}")
        if self.placement_timeout_s <= 0:
            raise ValueError(f"placement_timeout_s must be > 0, got {self.placement_timeout_s}")


@dataclass(frozen=True)
class NodeInfo:
    """An alive Ray node: its id (hex) and total resources."""

    node_id: str
    resources: Mapping[str, float]


@dataclass(frozen=True)
class GroupPlan:
    """One placement group: `bundles[r]` holds process `process_names[r]` (rank r of the group).

    role: "router", "prefill" or "decode"; index: the worker's number within its role (0 for the
    router); target_node: a soft placement hint (node id) or None.
    """

    name: str
    role: str
    index: int
    bundles: tuple[Mapping[str, float], ...]
    strategy: str
    target_node: str | None = None

    @property
    def ep_size(self) -> int:
        return len(self.bundles)

    @property
    def process_names(self) -> tuple[str, ...]:
        """The worker ids the processes register under (`<role>-<i>`, or `<role>-<i>-ep<r>`)."""
        if self.ep_size == 1:
            return (self.name,)
        return tuple(f"{self.name}-ep{r}" for r in range(self.ep_size))

    def total(self) -> dict[str, float]:
        """What the whole group needs (what one node must hold under STRICT_PACK)."""
        out: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                out[k] = out.get(k, 0.0) + v
        return out


def gpus_per_rank(device: str | None, requested: float | None) -> float:
    """The GPUs a worker process's bundle asks for: `requested` (--ray-gpus-per-rank) when given, else
    one per rank when the workers run with --device cuda / cuda:N (each rank then sees the one GPU Ray
    assigned it as cuda:0 through CUDA_VISIBLE_DEVICES), else none. --device cuda with 0 GPUs is
    refused: the workers would find no device."""
    cuda = device is not None and device.startswith("cuda")
    if requested is None:
        return 1.0 if cuda else 0.0
    if cuda and requested <= 0:
        raise ValueError(f"--device {device} needs --ray-gpus-per-rank > 0 (got {requested:g})")
    return float(requested)


def fits(need: Mapping[str, float], have: Mapping[str, float]) -> bool:
    return all(have.get(k, 0.0) >= v for k, v in need.items() if v > 0)


def plan_groups(spec: ClusterSpec, options: RayOptions, nodes: Sequence[NodeInfo]) -> list[GroupPlan]:
    """The router's group first, then prefill-0.., then decode-0.. (each `spec.ep_size` ranks).

    Worker groups are spread by soft targets over the nodes able to hold a whole group, taken in the
    given order; with spreading off, PACK groups, or no such node, groups have no target and Ray places
    them where they fit. Raises ValueError naming the group when no node could ever hold a rank.
    """
    rank = dict(options.rank_resources)
    if nodes and not any(fits(rank, n.resources) for n in nodes):
        raise ValueError(
            f"no Ray node can hold one worker process needing {rank}; "
            f"nodes have {[dict(n.resources) for n in nodes]}"
        )
    groups = [GroupPlan("router", "router", 0, (dict(options.router_resources),), "STRICT_PACK")]
    workers = [
        GroupPlan(
            f"{role}-{i}", role, i, tuple(dict(rank) for _ in range(spec.ep_size)), options.group_strategy
        )
        for role, n in (("prefill", spec.num_prefill), ("decode", spec.num_decode))
        for i in range(n)
    ]
    if not options.spread_groups or options.group_strategy != "STRICT_PACK" or not workers:
        return groups + workers
    capable = [n.node_id for n in nodes if fits(workers[0].total(), n.resources)]
    if not capable:
        return groups + workers
    target = {g.name: capable[k % len(capable)] for k, g in enumerate(interleave(workers))}
    return groups + [
        GroupPlan(g.name, g.role, g.index, g.bundles, g.strategy, target[g.name]) for g in workers
    ]


def interleave(groups: Sequence[GroupPlan]) -> list[GroupPlan]:
    """prefill-0, decode-0, prefill-1, decode-1, ...: consecutive targets alternate roles, so a node
    lost takes a share of each role rather than all of one."""
    by_role = [[g for g in groups if g.role == r] for r in WORKER_ROLES]
    out: list[GroupPlan] = []
    for k in range(max(len(x) for x in by_role)):
        out += [x[k] for x in by_role if k < len(x)]
    return out
