"""`RayConnector`: workers as named Ray actors, driven through a `RayHandle`.

Ray is not a dependency of k2serve; the connector is written against the small `RayHandle` interface
(what a Ray-backed implementation must do is in its docstring), so it is testable without Ray. Worker
names are "<prefix>-<role>-<i>"; scale-down drains the highest indices first, like a StatefulSet.
"""

from __future__ import annotations

import re
from typing import Protocol

from k2serve.planner.connector import Connector, ConnectorError, check_request


class RayHandle(Protocol):
    """The Ray operations the connector needs.

    - `list_workers(prefix)`: names of the live worker actors whose name starts with `prefix`
      (including ones still starting and ones draining).
    - `start_worker(role, name)`: create the named (detached) actor running a k2serve worker of `role`
      that registers with the router; returns once the actor is scheduled, not when it is ready.
      Raises RuntimeError when Ray refuses (no resources, name taken).
    - `drain_worker(name, timeout_s)`: ask the actor to drain as on SIGTERM (deregister, finish in-flight
      work, exit) and return at once; after `timeout_s` seconds the handle kills it
      (`ray.kill`). Raises RuntimeError when no such actor exists.
    """

    def list_workers(self, prefix: str) -> list[str]: ...

    def start_worker(self, role: str, name: str) -> None: ...

    def drain_worker(self, name: str, timeout_s: float) -> None: ...


class RayConnector(Connector):
    """Counts a role's actors that it has not asked to drain; adopts actors already running under its
    prefix when created."""

    def __init__(self, handle: RayHandle, prefix: str = "k2serve", drain_timeout_s: float = 120.0) -> None:
        self.handle = handle
        self.prefix = prefix
        self.drain_timeout_s = drain_timeout_s
        self._draining: set[str] = set()

    def _index(self, name: str, role: str) -> int | None:
        m = re.fullmatch(rf"{re.escape(self.prefix)}-{role}-(\d+)", name)
        return int(m.group(1)) if m else None

    def _active(self, role: str) -> dict[int, str]:
        """index -> name of the role's live actors not draining."""
        live = self.handle.list_workers(f"{self.prefix}-{role}-")
        self._draining &= set(live)  # forget the drained ones that are gone
        out = {}
        for name in live:
            i = self._index(name, role)
            if i is not None and name not in self._draining:
                out[i] = name
        return out

    def replicas(self, role: str) -> int:
        check_request(role, 0)
        return len(self._active(role))

    def scale(self, role: str, n: int) -> None:
        check_request(role, n)
        active = self._active(role)
        taken = set(active) | {self._index(x, role) for x in self._draining}
        try:
            i = 0
            while len(active) < n:
                if i not in taken:
                    name = f"{self.prefix}-{role}-{i}"
                    self.handle.start_worker(role, name)
                    active[i] = name
                i += 1
            for i in sorted(active, reverse=True)[: max(0, len(active) - n)]:
                self.handle.drain_worker(active[i], self.drain_timeout_s)
                self._draining.add(active.pop(i))
        except RuntimeError as e:
            raise ConnectorError(role, n, f"Ray: {e}") from e
