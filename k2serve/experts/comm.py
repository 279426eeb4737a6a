"""The expert-parallel process group: gloo collectives with a timeout and typed failures.

The group is a standalone `ProcessGroupGloo` built on a `TCPStore` (no torch.distributed default
group, no module globals), so a process can hold it alongside other groups. Only tensor collectives
cross the network; nothing is pickled.

When a collective fails (a peer died: gloo reports the closed connection at once; a peer hung: the
timeout fires), the failing rank holds a roll call through the store: each surviving rank that also
failed reports in, and the ranks that do not report within `roll_call` are named as the suspects.
If the store itself is unreachable, its host (rank 0) is the suspect. The result is an `EPError`
naming the operation, the MoE layer and the suspected peers; the group is unusable afterwards.
"""

from __future__ import annotations

import time
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from k2serve.engine.group import GroupLostError


class EPError(GroupLostError):
    """A collective of the expert-parallel group failed on `rank` during `where` (MoE `layer`, or None
    outside a layer); `peers` are the ranks suspected dead or hung; `cause` is the backend's message."""

    def __init__(self, rank: int, where: str, layer: int | None, peers: tuple[int, ...], cause: str) -> None:
        at = f" in MoE layer {layer}" if layer is not None else ""
        who = f"suspected peer rank(s) {list(peers)}" if peers else "no peer identified"
        super().__init__(f"expert-parallel rank {rank}: {where}{at} failed; {who}: {cause}")
        self.rank = rank
        self.where = where
        self.layer = layer
        self.peers = peers
        self.cause = cause


class EPConfigError(ValueError):
    """Bad arguments for building the group (init method, rank, world size); carries the value."""

    def __init__(self, message: str, value: object) -> None:
        super().__init__(f"{message}: {value!r}")
        self.value = value


_GROUP_FAILED = "group_failed"  # store key set by the first rank that sees the group fail


def parse_init_method(init_method: str) -> tuple[str, int]:
    """'tcp://host:port' -> (host, port)."""
    u = urlparse(init_method)
    if u.scheme != "tcp" or not u.hostname or not u.port:
        raise EPConfigError("init_method must look like tcp://host:port", init_method)
    return u.hostname, u.port


class EPComm:
    """Rank, world size and the gloo group of one expert-parallel group.

    Contract: every rank calls the same collectives in the same order with matching sizes; a
    failure raises `EPError` on each surviving rank within about `timeout + roll_call`.
    """

    def __init__(
        self, store: dist.Store, rank: int, world_size: int, timeout: timedelta, roll_call: timedelta
    ) -> None:
        if not 0 <= rank < world_size:
            raise EPConfigError(f"rank must be in [0, {world_size})", rank)
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.roll_call = roll_call
        self._store = store
        self._pg: dist.ProcessGroupGloo | None = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        self._failure: EPError | None = None
        self.all_to_all_count = 0  # since start, read by the metrics endpoint
        self.all_to_all_seconds = 0.0

    @classmethod
    def connect(
        cls,
        init_method: str,
        rank: int,
        world_size: int,
        timeout: timedelta = timedelta(seconds=60),
        roll_call: timedelta = timedelta(seconds=2),
    ) -> EPComm:
        """Join the group at `init_method` (rank 0 hosts the store). Blocks until all ranks joined or
        `timeout` passes (then EPError naming no peer). `timeout` bounds every later collective, so it
        must exceed the longest step any rank may take."""
        host, port = parse_init_method(init_method)
        if world_size < 1:
            raise EPConfigError("world_size must be >= 1", world_size)
        deadline = time.monotonic() + timeout.total_seconds()
        while True:
            try:
                store = dist.PrefixStore(
                    "ep", dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout)
                )
                # A rank restarted right after its group failed can reach the old rank 0 while that
                # one still stops (its roll call keeps the store up): such a store says so; retry.
                stale = rank != 0 and store.check([_GROUP_FAILED])
                if not stale:
                    return cls(store, rank, world_size, timeout, roll_call)
            except RuntimeError as e:  # DistStoreError / gloo errors from the rendezvous
                raise EPError(rank, f"joining {init_method}", None, (), str(e)) from e
            if time.monotonic() > deadline:
                raise EPError(
                    rank, f"joining {init_method}", None, (0,), "only a failed group's rank 0 answered"
                )
            time.sleep(0.5)

    # ---- collectives ---------------------------------------------------------------------------
    def all_to_all(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        out_splits: list[int],
        in_splits: list[int],
        where: str,
        layer: int | None = None,
    ) -> None:
        """Rows inp[sum(in_splits[:p]) :][: in_splits[p]] go to rank p; out receives rank p's rows at
        out_splits' offsets. Both contiguous, split along dim 0. Empty splits are allowed."""
        pg = self._check()
        t0 = time.perf_counter()
        try:
            pg.alltoall_base(out, inp, out_splits, in_splits, dist.AllToAllOptions()).wait()  # type: ignore[attr-defined]  # a gloo Backend has it at run time; torch's stubs omit it
        except RuntimeError as e:
            raise self._fail(where, layer, e) from e
        self.all_to_all_seconds += time.perf_counter() - t0
        self.all_to_all_count += 1

    def all_reduce(self, t: torch.Tensor, op: str, where: str) -> None:
        """In place over the group; op is "sum" or "max"."""
        pg = self._check()
        opts = dist.AllreduceOptions()
        opts.reduceOp = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]  # type: ignore[assignment]  # torch's stubs type the members RedOpType
        try:
            pg.allreduce([t], opts).wait()  # type: ignore[attr-defined]  # as alltoall_base
        except RuntimeError as e:
            raise self._fail(where, None, e) from e

    def close(self) -> None:
        self._pg = None

    # ---- failures ------------------------------------------------------------------------------
    def _check(self) -> dist.ProcessGroupGloo:
        if self._failure is not None:
            raise self._failure
        if self._pg is None:
            raise EPError(self.rank, "use after close", None, (), "the group was closed")
        return self._pg

    def _fail(self, where: str, layer: int | None, exc: Exception) -> EPError:
        """Roll call: report this rank's failure, wait `roll_call` for the others', name the silent ones."""
        peers: tuple[int, ...]
        try:
            self._store.set_timeout(self.roll_call)
            self._store.set(_GROUP_FAILED, str(self.rank))  # a restarted rank must not join this store
            self._store.set(f"failed/{self.rank}", where)
            pending = {p for p in range(self.world_size) if p != self.rank}
            deadline = time.monotonic() + self.roll_call.total_seconds()
            while pending and time.monotonic() < deadline:
                pending -= {p for p in pending if self._store.check([f"failed/{p}"])}
                time.sleep(0.05)
            peers = tuple(sorted(pending))
        except RuntimeError:  # DistStoreError: the store lives on rank 0, so rank 0 is gone
            peers = (0,) if self.rank != 0 else ()
        self._failure = EPError(self.rank, where, layer, peers, str(exc).splitlines()[0][:400])
        self._pg = None
        return self._failure
