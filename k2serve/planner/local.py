"""`LocalConnector`: adds and removes worker processes of a running `LocalCluster` (`k2serve up`).

Scale-up starts worker `<role>-<i>` (the lowest free index; an expert-parallel worker is its group of
rank processes `<role>-<i>-ep<r>`) through the cluster's own spawner; it registers with the router when
ready. Scale-down drains the highest indices first: SIGTERM each process of the worker (the worker
then deregisters from the router and finishes its in-flight work before exiting, see
`k2serve.worker.runtime.serve_worker`), and SIGKILL its process group if it is still running
`drain_timeout_s` later. Exited processes leave `cluster.procs`, so the cluster's own watchdog does
not mistake a drained worker for a crash.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass

from k2serve.cluster.local import LocalCluster, Proc
from k2serve.planner.connector import Connector, ConnectorError, check_request


@dataclass
class _Draining:
    proc: Proc
    deadline: float  # time.monotonic() after which it is killed


class LocalConnector(Connector):
    """Not thread-safe: call it from one thread (the planner loop)."""

    def __init__(self, cluster: LocalCluster, drain_timeout_s: float = 30.0) -> None:
        if drain_timeout_s <= 0:
            raise ValueError(f"drain_timeout_s must be > 0, got {drain_timeout_s}")
        self.cluster = cluster
        self.drain_timeout_s = drain_timeout_s
        self.draining: list[_Draining] = []

    # ---- the cluster's worker processes ----------------------------------------------------------
    def _groups(self, role: str) -> dict[int, list[Proc]]:
        """index -> processes of the role's workers that are not draining."""
        pattern = re.compile(rf"{role}-(\d+)(?:-ep\d+)?")
        draining = {id(d.proc) for d in self.draining}
        out: dict[int, list[Proc]] = {}
        for p in self.cluster.procs:
            m = pattern.fullmatch(p.name)
            if m and id(p) not in draining:
                out.setdefault(int(m.group(1)), []).append(p)
        return out

    def reap(self) -> None:
        """Forget drained workers that exited, SIGKILL those past their deadline; a worker that exited
        without being asked raises ConnectorError (once: it is forgotten too, so it stops counting)."""
        now = time.monotonic()
        for d in list(self.draining):
            if d.proc.popen.poll() is None and now >= d.deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(d.proc.popen.pid, signal.SIGKILL)
                d.proc.popen.wait()
            if d.proc.popen.poll() is not None:
                self.draining.remove(d)
                self._forget(d.proc)
        for role in ("prefill", "decode"):
            for procs in self._groups(role).values():
                for p in procs:
                    if p.popen.poll() is not None:
                        self._forget(p)
                        raise ConnectorError(
                            role, None, f"{p.name} exited with {p.popen.returncode}:\n{p.tail(10)}"
                        )

    def _forget(self, proc: Proc) -> None:
        with contextlib.suppress(ValueError):
            self.cluster.procs.remove(proc)

    # ---- the contract ----------------------------------------------------------------------------
    def replicas(self, role: str) -> int:
        check_request(role, 0)
        self.reap()
        return len(self._groups(role))

    def scale(self, role: str, n: int) -> None:
        check_request(role, n)
        self.reap()
        groups = self._groups(role)
        busy = set(groups) | {
            int(m.group(1)) for d in self.draining if (m := re.match(rf"{role}-(\d+)", d.proc.name))
        }
        i = 0
        while len(groups) < n:
            if i not in busy:
                for stale in self.cluster.dir.glob(f"{role}-{i}.ready"):
                    stale.unlink()
                for stale in self.cluster.dir.glob(f"{role}-{i}-ep*.ready"):
                    stale.unlink()
                self.cluster.spawn_worker(role, i)
                groups[i] = [p for p in self.cluster.procs if re.fullmatch(rf"{role}-{i}(?:-ep\d+)?", p.name)]
            i += 1
        deadline = time.monotonic() + self.drain_timeout_s
        for i in sorted(groups, reverse=True)[: max(0, len(groups) - n)]:
            for p in groups.pop(i):
                with contextlib.suppress(ProcessLookupError):
                    p.popen.send_signal(signal.SIGTERM)
                self.draining.append(_Draining(p, deadline))

    # ---- waiting (tests, the CLI) ----------------------------------------------------------------
    def wait_settled(self, timeout_s: float) -> None:
        """Block until every draining worker has exited and the router lists exactly the workers this
        connector counts, all ready; ConnectorError (role "cluster") after `timeout_s` seconds."""
        end = time.monotonic() + timeout_s
        while True:
            self.reap()
            want = {
                p.name for role in ("prefill", "decode") for ps in self._groups(role).values() for p in ps
            }
            with contextlib.suppress(OSError, ValueError):
                have = {w["worker_id"] for w in self.cluster.workers() if w["ready"]}
                if not self.draining and have == want:
                    return
            if time.monotonic() > end:
                raise ConnectorError(
                    "cluster",
                    None,
                    f"not settled in {timeout_s:.0f} s: want {sorted(want)}, "
                    f"draining {[d.proc.name for d in self.draining]}",
                )
            time.sleep(0.1)
