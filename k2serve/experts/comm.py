"""The expert-parallel process group: collectives with a timeout and typed failures, gloo on CPU and
NCCL on CUDA.

The group is a standalone `ProcessGroupGloo` (CPU ranks) or `ProcessGroupNCCL` (CUDA ranks, each on
its own device: `ep_rank_device`) built on a `TCPStore` (no torch.distributed default group, no
module globals), so a process can hold it alongside other groups. The backend follows the rank's
device (`ep_backend`): the MoE all-to-alls then move the device tensors the experts compute on, with
no host copy; the small host tensors of the lockstep (step flags, EPLB load counts) are copied to the
device for their collective and back. Only tensor collectives cross the network; nothing is pickled.

When a collective fails (a peer died: gloo reports the closed connection at once; a peer hung: the
timeout fires), the failing rank holds a roll call through the store: each surviving rank that also
failed reports in, and the ranks that do not report within `roll_call` are named as the suspects.
If the store itself is unreachable, its host (rank 0) is the suspect. The result is an `EPError`
naming the operation, the MoE layer and the suspected peers; the group is unusable afterwards.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from k2serve.engine.config import indexed_device
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


def ep_backend(device: torch.device) -> str:
    """The collective backend of a rank whose tensors live on `device`: NCCL for CUDA, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def ep_rank_device(
    device: torch.device, ep_rank: int, device_count: int, local_rank: int | None = None
) -> torch.device:
    """Where rank `ep_rank` of an expert-parallel group runs when its worker was given `device`.

    CPU stays CPU. A bare "cuda" puts each rank on its own GPU, `cuda:{local_rank}`: `local_rank` (the
    launcher's LOCAL_RANK) when given, else ep_rank modulo the GPUs this host has (ranks 0..7 of an
    8-GPU host get cuda:0..7; one rank per single-GPU pod gets cuda:0). An explicit "cuda:N" is kept
    (the operator placed the rank). With no GPU visible (a config checked on a machine without one)
    a bare "cuda" is returned as it is.
    """
    if device.type != "cuda" or device.index is not None:
        return device
    if local_rank is not None:
        if local_rank < 0:
            raise EPConfigError("LOCAL_RANK must be >= 0", local_rank)
        return torch.device("cuda", local_rank)
    if device_count < 1:
        return device
    return torch.device("cuda", ep_rank % device_count)


def local_ep_device(device: torch.device, ep_rank: int) -> torch.device:
    """`ep_rank_device` on this host: its GPU count, and $LOCAL_RANK when a launcher set it."""
    local = os.environ.get("LOCAL_RANK", "").strip()
    if local and not local.isdigit():
        raise EPConfigError("LOCAL_RANK must be a non-negative integer", local)
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    return ep_rank_device(device, ep_rank, count, int(local) if local else None)


def parse_init_method(init_method: str) -> tuple[str, int]:
    """'tcp://host:port' -> (host, port)."""
    u = urlparse(init_method)
    if u.scheme != "tcp" or not u.hostname or not u.port:
        raise EPConfigError("init_method must look like tcp://host:port", init_method)
    return u.hostname, u.port


class EPComm:
    """Rank, world size, device and the process group (gloo or NCCL: `ep_backend(device)`) of one
    expert-parallel group.

    Contract: every rank calls the same collectives in the same order with matching sizes; a
    failure raises `EPError` on each surviving rank within about `timeout + roll_call` (on NCCL, an
    operation that hangs past `timeout` is reported by NCCL's watchdog, which may end the process:
    the launcher restarts the group either way).
    """

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        timeout: timedelta,
        roll_call: timedelta,
        device: torch.device | str = "cpu",
    ) -> None:
        if not 0 <= rank < world_size:
            raise EPConfigError(f"rank must be in [0, {world_size})", rank)
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.roll_call = roll_call
        self.device = indexed_device(torch.device(device))
        self.backend = ep_backend(self.device)
        self._store = store
        self._pg: dist.ProcessGroup | None = _make_group(store, rank, world_size, timeout, self.device)
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
        device: torch.device | str = "cpu",
    ) -> EPComm:
        """Join the group at `init_method` (rank 0 hosts the store). Blocks until all ranks joined or
        `timeout` passes (then EPError naming no peer). `timeout` bounds every later collective, so it
        must exceed the longest step any rank may take. `device`: this rank's (NCCL when CUDA)."""
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
                    return cls(store, rank, world_size, timeout, roll_call, device)
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
        out_splits' offsets. Both contiguous, split along dim 0. Empty splits are allowed. On NCCL,
        tensors already on the group's device move as they are; others go through it."""
        pg = self._check()
        t0 = time.perf_counter()
        dev_out, dev_inp = self._on_device(out), self._on_device(inp)
        try:
            pg.alltoall_base(dev_out, dev_inp, out_splits, in_splits, dist.AllToAllOptions()).wait()
        except RuntimeError as e:
            raise self._fail(where, layer, e) from e
        if dev_out is not out:
            out.copy_(dev_out)
        self.all_to_all_seconds += time.perf_counter() - t0
        self.all_to_all_count += 1

    def all_reduce(self, t: torch.Tensor, op: str, where: str) -> None:
        """In place over the group; op is "sum" or "max"."""
        pg = self._check()
        opts = dist.AllreduceOptions()
        opts.reduceOp = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]  # type: ignore[assignment]  # torch's stubs type the members RedOpType
        dev = self._on_device(t)
        try:
            pg.allreduce([dev], opts).wait()
        except RuntimeError as e:
            raise self._fail(where, None, e) from e
        if dev is not t:
            t.copy_(dev)

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        """t itself when the backend can take it (gloo: any CPU tensor; NCCL: one on the group's
        device), else a copy on the group's device (the caller copies results back)."""
        if self.backend == "gloo" or t.device == self.device:
            return t
        return t.to(self.device)

    def close(self) -> None:
        self._pg = None

    # ---- failures ------------------------------------------------------------------------------
    def _check(self) -> dist.ProcessGroup:
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


def _make_group(
    store: dist.Store, rank: int, world_size: int, timeout: timedelta, device: torch.device
) -> dist.ProcessGroup:
    """The group's backend for `device` (ep_backend): gloo, or NCCL bound to this rank's GPU."""
    if ep_backend(device) == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)  # type: ignore[return-value]  # backends serve as groups; torch's stubs disagree
    torch.cuda.set_device(device)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, opts)  # type: ignore[return-value]  # as above
