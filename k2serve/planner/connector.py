"""Connectors apply replica counts to a platform; `VirtualConnector` is the in-memory reference.

Implementations: `VirtualConnector` (here; tests and the dry-run), `kube.KubernetesConnector` (the
StatefulSets' scale subresource), `ray_actors.RayConnector` (worker actors through a Ray handle),
`local.LocalConnector` (processes of a `LocalCluster`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from k2serve.planner.config import ROLES
from k2serve.planner.policy import Decision


class ConnectorError(RuntimeError):
    """The platform refused or failed a scaling action; names the role and the count asked for."""

    def __init__(self, role: str, replicas: int | None, reason: str) -> None:
        asked = "" if replicas is None else f" to {replicas}"
        super().__init__(f"scaling {role}{asked}: {reason}")
        self.role = role
        self.replicas = replicas
        self.reason = reason


class Connector:
    """Applies the planner's counts to one deployment. Roles are "prefill" and "decode".

    Contract:
    - `replicas(role) -> int`: the role's target count: what the platform was last told, or what it runs
      if it was never told. It is the "current" count the planner decides from.
    - `scale(role, n)`: make `n` (>= 0) the role's target. Added replicas start workers that register
      with the router when ready. Removed replicas are DRAINED: a removed worker takes no new requests,
      finishes the ones it is running, then exits; it is killed only when the platform's drain deadline
      passes (Kubernetes: the pod's terminationGracePeriodSeconds; local: `drain_timeout_s`).
      `scale` may return before new workers are ready or removed ones have exited, but `replicas(role)`
      reports `n` as soon as it returns. Asking for the current count is a no-op.
    - Errors: a refused or failed action raises ConnectorError naming the role and `n`; a role other
      than prefill/decode or `n` < 0 raises ValueError. Nothing is retried silently.
    - `close()` releases the connector's own resources (not the workers).
    """

    def replicas(self, role: str) -> int:
        raise NotImplementedError

    def scale(self, role: str, n: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the connector's own resources; default: nothing."""


def check_request(role: str, n: int) -> None:
    """The argument checks every connector shares (ValueError naming the value)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"replicas must be an integer >= 0, got {n!r}")


def apply(decision: Decision, connector: Connector) -> list[tuple[str, int, int]]:
    """Scale every role the decision changes; returns (role, from, to) of the actions taken. A
    ConnectorError from one role propagates (the other role may already have been scaled)."""
    done = []
    for role in ROLES:
        d = decision.role(role)
        if d.changed:
            connector.scale(role, d.target)
            done.append((role, d.current, d.target))
    return done


@dataclass(frozen=True)
class ScaleAction:
    role: str
    before: int
    after: int


@dataclass
class VirtualConnector(Connector):
    """Replica counts in memory: scaling is immediate and every action is recorded in `actions`
    (no-ops are not). Draining is instantaneous: there are no workers."""

    counts: dict[str, int] = field(default_factory=lambda: {"prefill": 1, "decode": 1})
    actions: list[ScaleAction] = field(default_factory=list)

    def __post_init__(self) -> None:
        if sorted(self.counts) != sorted(ROLES):
            raise ValueError(f"counts must name exactly {ROLES}, got {sorted(self.counts)}")
        for role, n in self.counts.items():
            check_request(role, n)

    def replicas(self, role: str) -> int:
        check_request(role, 0)
        return self.counts[role]

    def scale(self, role: str, n: int) -> None:
        check_request(role, n)
        if n != self.counts[role]:
            self.actions.append(ScaleAction(role, self.counts[role], n))
            self.counts[role] = n
