"""`k2serve up --ray ADDRESS|auto`: the router and the prefill and decode workers as Ray actors on an
existing Ray cluster, each actor supervising one `python -m k2serve <role>` process (`ray_actor`).

Start order, as `LocalCluster`: the placement groups (`ray_plan`: one per worker or EP group, ranks
packed, groups spread), the router (with the embedded Redis beside it unless a Redis URL is given),
then the workers, which register with the router; `start()` returns when all are registered.

Addresses: every worker binds the IP Ray knows for its node (the address other nodes reach, and the
one its KV endpoints carry). The router binds a wildcard `spec.host` (0.0.0.0, ::) as given and its
node's IP otherwise (a loopback router could not be reached from other nodes); its ports, and the
rendezvous port of each EP group, are picked on their node before the actors exist, so an actor that
Ray restarts binds the same addresses again. Ray restarts a dead actor (`RayOptions.max_restarts`);
its new process registers with the router by itself. Ports 0 in `spec` mean "pick free ones".

Every node must have k2serve installed and the checkpoint at `spec.model_dir`; logs go to
`<workdir>/logs/<process>.log` on the node that ran the process.

TLS (`spec.tls`, `k2serve up --ray --tls-cert ... --tls-key ... [--tls-ca ...]`): every process gets
the same certificate flags, as under the local launcher, so the PEM files must exist at the same paths
on every node (they are checked on the driver's node only; a node without them fails to start its
process, and the error names the file). Processes dial each other at their nodes' IPs: the certificate
must carry every node's IP as a SAN, or use one DNS SAN for all and pass `--tls-server-name` with it.

The cluster token (read from `spec.cluster_token_file` on the driver, else generated per cluster) goes
to each actor, which writes it to a 0600 file on its node for its process (`ChildSpec.cluster_token`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from k2serve.cluster.local import (
    ClusterError,
    ClusterSpec,
    metrics_urls,
    registered_workers,
    router_ready,
    text_table,
)
from k2serve.cluster.ray_actor import NODE_IP, REDIS_PASSWORD_FILE, REDIS_URL, ChildSpec
from k2serve.cluster.ray_plan import GroupPlan, NodeInfo, RayOptions, plan_groups
from k2serve.rpc.auth import read_token_file

WILDCARDS = ("0.0.0.0", "::", "")  # noqa: S104 - recognised, not bound: a router given one binds it


class RayUnavailableError(ClusterError):
    """`ray` is not installed (or not importable); the message says how to install it."""


class RayRuntimeError(ClusterError):
    """The cluster could not start on Ray: names the process or placement group and what went wrong."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise RayUnavailableError(
            f"--ray needs the 'ray' package ({e}); install it with: pip install 'k2serve[ray]'"
        ) from e
    return ray


@dataclass
class RayProc:
    """One process of the cluster: its actor handle and the placement group holding it."""

    name: str
    group: GroupPlan
    rank: int
    actor: Any  # ray.actor.ActorHandle


class RayCluster:
    """A k2serve cluster on the Ray cluster at `address` ("auto", "host:port", "ray://..."); the same
    surface as LocalCluster: start() / stop() / http_url / workers() / context manager.

    If Ray is not yet initialised in this process, start() connects (namespace `options.namespace`)
    and stop() disconnects; otherwise the caller's connection is used and left open. The actors are
    owned by this driver: they end with it."""

    def __init__(self, spec: ClusterSpec, address: str, options: RayOptions | None = None) -> None:
        self.token = (
            read_token_file(spec.cluster_token_file) if spec.cluster_token_file else secrets.token_urlsafe(32)
        )
        self.spec = dataclasses.replace(spec, cluster_token_file=None)  # each actor writes its own file
        self.address = address
        self.options = options or RayOptions()
        self.run_id = uuid.uuid4().hex[:8]
        # the same absolute path on every node (each creates it for the processes it runs)
        self.workdir = os.path.abspath(spec.workdir or f"/tmp/k2serve-ray-{self.run_id}")  # noqa: S108
        self.procs: list[RayProc] = []
        self.pgs: dict[str, Any] = {}
        self.plan: list[GroupPlan] = []
        self.router_ip = ""
        self.http_port = spec.port
        self.grpc_port = spec.grpc_port
        self.internal_port = spec.internal_port
        self._owns_ray = False

    # ---- start -----------------------------------------------------------------------------------
    def start(self) -> RayCluster:
        ray = import_ray()
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, namespace=self.options.namespace, log_to_driver=True)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise RayRuntimeError(f"cannot connect to the Ray cluster at {self.address!r}: {e}") from e
            self._owns_ray = True
        deadline = time.monotonic() + self.spec.startup_timeout_s
        try:
            nodes = [
                NodeInfo(n["NodeID"], n["Resources"]) for n in ray.nodes() if n.get("Alive", n.get("alive"))
            ]
            try:
                self.plan = plan_groups(self.spec, self.options, nodes)
            except ValueError as e:
                raise RayRuntimeError(str(e)) from e
            self._place_groups(ray)
            self._start_router(ray, deadline)
            for g in self.plan[1:]:
                self._start_worker_group(ray, g)
            self._wait_ready(ray, self.procs[1:], deadline)
            self._wait_registered(self.spec.num_worker_processes, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _place_groups(self, ray: Any) -> None:
        from ray.util.placement_group import placement_group

        for g in self.plan:
            kwargs = {"_soft_target_node_id": g.target_node} if g.target_node else {}
            self.pgs[g.name] = placement_group(
                [dict(b) for b in g.bundles],
                strategy=g.strategy,
                name=f"k2serve-{self.run_id}-{g.name}",
                **kwargs,
            )
        refs = {g.name: self.pgs[g.name].ready() for g in self.plan}
        ready, _ = ray.wait(
            list(refs.values()), num_returns=len(refs), timeout=self.options.placement_timeout_s
        )
        missing = [g for g in self.plan if refs[g.name] not in ready]
        if missing:
            raise RayRuntimeError(
                f"placement groups not placed within {self.options.placement_timeout_s:.0f} s: "
                + "; ".join(
                    f"{g.name} ({g.strategy}, bundles {[dict(b) for b in g.bundles]})" for g in missing
                )
                + f"; cluster resources {ray.cluster_resources()}, available {ray.available_resources()}"
            )

    def _strategy(self, g: GroupPlan, rank: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(self.pgs[g.name], placement_group_bundle_index=rank)

    def _probe(self, ray: Any, g: GroupPlan, n_ports: int) -> tuple[str, list[int]]:
        from k2serve.cluster.ray_actor import probe_ports

        task = ray.remote(probe_ports).options(num_cpus=0, scheduling_strategy=self._strategy(g, 0))
        return tuple(ray.get(task.remote(n_ports), timeout=self.options.placement_timeout_s))

    def _actor(self, ray: Any, g: GroupPlan, rank: int, name: str, child: ChildSpec) -> RayProc:
        from k2serve.cluster.ray_actor import ProcessActor

        res = dict(g.bundles[rank])
        actor = (
            ray.remote(ProcessActor)
            .options(
                name=f"k2serve-{self.run_id}-{name}",
                num_cpus=res.pop("CPU", 0),
                num_gpus=res.pop("GPU", 0),
                resources=res or None,
                max_restarts=self.options.max_restarts,
                max_task_retries=0,
                max_concurrency=1,
                scheduling_strategy=self._strategy(g, rank),
            )
            .remote(child)
        )
        p = RayProc(name, g, rank, actor)
        self.procs.append(p)
        return p

    def _child(self, name: str, argv: list[str], embedded_redis: bool = False) -> ChildSpec:
        return ChildSpec(name, tuple(argv), self.workdir, dict(self.spec.env), embedded_redis, self.token)

    def router_child(self) -> ChildSpec:
        """The router's process: `spec.router_args_for` bound to its node's IP (or the wildcard
        `spec.host`) on `http_port` / `grpc_port`, with the embedded Redis beside it unless the spec
        names one or has none."""
        s = self.spec
        bind = s.host if s.host in WILDCARDS else NODE_IP
        use_embedded = s.use_redis and s.redis is None
        if s.redis is not None:
            redis_args = s.redis.argv()
        elif use_embedded:
            redis_args = ["--redis-url", REDIS_URL, "--redis-password-file", REDIS_PASSWORD_FILE]
        else:
            redis_args = []
        argv = s.router_args_for(bind, self.http_port, self.grpc_port, redis_args, self.internal_port)
        return self._child("router", argv, use_embedded)

    def worker_children(self, g: GroupPlan, rendezvous: str | None = None) -> list[ChildSpec]:
        """The processes of worker group `g` (`spec.worker_args` on their node's IP, registering with
        the router's internal listener at `router_ip:internal_port`); an EP group's ranks meet at
        `rendezvous` (tcp://IP:PORT)."""
        router = f"{self.router_ip}:{self.internal_port}"
        if g.ep_size == 1:
            return [self._child(g.name, self.spec.worker_args(g.role, g.name, NODE_IP, router))]
        return [
            self._child(name, self.spec.worker_args(g.role, g.name, NODE_IP, router, r, rendezvous))
            for r, name in enumerate(g.process_names)
        ]

    def _start_router(self, ray: Any, deadline: float) -> None:
        s, g = self.spec, self.plan[0]
        self.router_ip, free = self._probe(ray, g, 3)
        self.http_port = s.port or free[0]
        self.grpc_port = s.grpc_port or free[1]
        self.internal_port = s.internal_port or free[2]
        router = self._actor(ray, g, 0, "router", self.router_child())
        self._wait_ready(ray, [router], deadline)

    def _start_worker_group(self, ray: Any, g: GroupPlan) -> None:
        rendezvous = None
        if g.ep_size > 1:
            ip, (port,) = self._probe(ray, g, 1)  # rank 0 hosts the group's rendezvous
            rendezvous = f"tcp://{ip}:{port}"
        for r, child in enumerate(self.worker_children(g, rendezvous)):
            self._actor(ray, g, r, child.name, child)

    def _wait_ready(self, ray: Any, procs: list[RayProc], deadline: float) -> None:
        from k2serve.cluster.ray_actor import ChildError

        left = max(1.0, deadline - time.monotonic())
        refs = [p.actor.wait_ready.remote(left) for p in procs]
        for p, ref in zip(procs, refs, strict=True):
            try:
                text = ray.get(ref, timeout=left + 30)
            except ChildError as e:
                raise RayRuntimeError(str(e)) from e
            except Exception as e:  # RayActorError, GetTimeoutError, RayTaskError wrapping ChildError
                cause = getattr(e, "cause", None)
                msg = str(cause) if isinstance(cause, ChildError) else f"{type(e).__name__}: {e}"
                raise RayRuntimeError(f"{p.name} did not start: {msg}") from e
            if p.name == "router":
                self.http_port, self.grpc_port, self.internal_port = (int(x) for x in text.split())

    def _wait_registered(self, n: int, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if sum(w["ready"] for w in self.workers()) >= n and router_ready(
                    self.http_url, self.spec.tls
                ):
                    return
            except (httpx.HTTPError, OSError, ValueError) as e:
                last = e
            time.sleep(0.1)
        raise RayRuntimeError(f"workers did not all get ready at the router at {self.http_url} ({last})")

    # ---- running ---------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        scheme = "https" if self.spec.tls is not None else "http"
        return f"{scheme}://{self.router_ip}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.router_ip}:{self.grpc_port}"

    def workers(self) -> list[dict]:
        """The router's registered workers (`GET /cluster/workers`)."""
        return registered_workers(self.http_url, self.spec.tls, self.spec.api_key)

    def proc(self, name: str) -> RayProc:
        for p in self.procs:
            if p.name == name:
                return p
        raise KeyError(f"no process {name!r}; have {[p.name for p in self.procs]}")

    def info(self, timeout_s: float = 30.0) -> list[dict[str, object]]:
        """Each process's `ProcessActor.info()` (waits for actors that are restarting)."""
        ray = import_ray()
        return ray.get([p.actor.info.remote() for p in self.procs], timeout=timeout_s)

    def dead(self, timeout_s: float = 2.0) -> list[str]:
        """Processes whose actors are dead for good (restarts used up). A call in flight when an actor
        dies fails the same way whether Ray restarts it or not, so a death is confirmed by a second
        call: a restarting actor queues it, a dead one fails it at once."""
        ray = import_ray()

        def died(procs: list[RayProc]) -> list[RayProc]:
            refs = [p.actor.info.remote() for p in procs]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            out = []
            for p, ref in zip(procs, refs, strict=True):
                if ref in done:
                    try:
                        ray.get(ref)
                    except ray.exceptions.ActorDiedError:
                        out.append(p)
                    except ray.exceptions.RayActorError:
                        pass  # unavailable for now: being restarted
            return out

        maybe = died(self.procs)
        return [p.name for p in died(maybe)] if maybe else []

    def status_table(self) -> str:
        """One row per process: node, pid, metrics URL (the router's own /metrics; each worker's as it
        registered it, "-" while it is not registered), log."""
        metrics = metrics_urls(self.http_url, self.workers)
        rows = [("process", "node", "pid", "metrics", "log")]
        for i in self.info():
            name = str(i["name"])
            rows.append((name, str(i["node_ip"]), str(i["pid"]), metrics.get(name) or "-", str(i["log"])))
        return text_table(rows)

    # ---- stop ------------------------------------------------------------------------------------
    def stop(self, timeout: float = 20.0) -> None:
        """Stop the router's process first (it drains), then the workers'; then kill every actor
        (no restart), remove the placement groups, and disconnect from Ray if start() connected."""
        with contextlib.suppress(RayUnavailableError):
            ray = import_ray()
            if ray.is_initialized():
                for group in (self.procs[:1], self.procs[1:]):
                    refs = [p.actor.stop.remote(timeout) for p in group]
                    with contextlib.suppress(Exception):  # dead or restarting actors: killed below
                        ray.wait(refs, num_returns=len(refs), timeout=timeout + 10)
                for p in self.procs:
                    with contextlib.suppress(Exception):
                        ray.kill(p.actor, no_restart=True)
                from ray.util.placement_group import remove_placement_group

                for pg in self.pgs.values():
                    with contextlib.suppress(Exception):
                        remove_placement_group(pg)
            if self._owns_ray:
                ray.shutdown()
                self._owns_ray = False
        self.procs.clear()
        self.pgs.clear()

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_on_ray(spec: ClusterSpec, address: str, options: RayOptions | None = None) -> int:
    """`k2serve up --ray ADDRESS|auto ...`: start on the Ray cluster at `address`, print where to send
    requests, run until SIGINT/SIGTERM or until an actor is dead for good (restarts used up), then stop
    everything. Returns 0 on a requested stop, 1 when a process was lost or the start failed, 2 without
    Ray. A signal during the start interrupts it (KeyboardInterrupt; what started is stopped)."""
    cluster = RayCluster(spec, address, options)
    print(
        f"starting k2serve on Ray ({address}): {spec.num_prefill} prefill + {spec.num_decode} decode "
        f"workers{f' of {spec.ep_size} EP ranks each' if spec.ep_size > 1 else ''} on {spec.model_dir} ...",
        flush=True,
    )
    try:
        cluster.start()
    except RayUnavailableError as e:
        print(f"k2serve up: error: {e}", file=sys.stderr)
        return 2
    except ClusterError as e:
        print(f"k2serve up: error: {e}", file=sys.stderr)
        return 1
    stop = {"now": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["now"] = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        print(cluster.status_table())
        print(f"\nready: OpenAI API {cluster.http_url}/v1  (e.g. curl {cluster.http_url}/v1/models)")
        print(
            f"       gRPC k2serve.v1.K2Serve at {cluster.grpc_address}; Ctrl-C stops everything", flush=True
        )
        while not stop["now"]:
            lost = cluster.dead()
            if lost:
                print(f"{', '.join(lost)}: Ray will not restart it again; stopping the cluster", flush=True)
                code = 1
                break
            time.sleep(2.0)
    finally:
        print("stopping ...", flush=True)
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("stopped.", flush=True)
    return code
