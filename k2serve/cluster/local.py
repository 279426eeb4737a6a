"""`k2serve up`: a whole cluster on this machine as separate processes, started in order and always stopped.

Order: Redis (embedded unless a URL is given), the router, then the prefill and decode workers, which
register with the router. `LocalCluster` waits until every worker is registered and ready and the
router's `/health/ready` answers 200, prints where to send requests, and on stop (Ctrl-C, SIGTERM, or `stop()`) drains the router, then stops the workers and Redis.
With `ep_size` R > 1 each worker is a group of R rank processes (`<role>-<i>-ep<r>`) meeting at a free
port of their own; each rank registers as its own worker. With `tls`, every process gets the same
certificate flags: all gRPC hops use (mutual) TLS and the router serves HTTPS. Every internal call
carries the cluster token: `LocalCluster` generates one per cluster (`secrets.token_urlsafe`) into a 0600
file of its workdir unless `cluster_token_file` names one, and hands every process that file.

`ClusterSpec.router_args_for` and `ClusterSpec.worker_args` build every process's command line, so the
launchers (this one, `ray_runtime.RayCluster`) start the same processes with the same flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from k2serve.cluster.lifeline import Lifeline
from k2serve.cluster.mooncake_master import MooncakeMaster
from k2serve.cluster.redis_server import EmbeddedRedis, RedisServerConfig
from k2serve.rpc.auth import write_token_file
from k2serve.rpc.tls import TLSFiles, transfer_backend_for
from k2serve.sessions.connection import RedisConnection


class ClusterError(RuntimeError):
    """The cluster could not start: names the process and shows the end of its log."""


@dataclass(frozen=True)
class ClusterSpec:
    model_dir: str
    host: str = "127.0.0.1"
    port: int = 8000  # router HTTP (0 = any free port)
    grpc_port: int = 50051  # router gRPC, the public API (0 = any free port)
    internal_port: int = 0  # router's internal listener, the worker registry (0 = any free port)
    num_prefill: int = 1
    num_decode: int = 1
    ep_size: int = 1  # expert-parallel ranks (processes) per worker
    eplb_config: str | None = None  # with ep_size > 1: EPLB on, this --eplb-config JSON; None: off
    transfer_backend: str = "auto"  # "auto": torch, or grpc with TLS (torch.distributed has no TLS)
    dtype: str = "float32"
    engine_args: tuple[str, ...] = ()  # engine flags passed to every worker
    redis: RedisConnection | None = None  # an external Redis; None: the embedded one (if use_redis)
    use_redis: bool = True
    api_key: str | None = None
    served_model_name: str | None = None
    workdir: str | None = None
    heartbeat_timeout_s: float = 5.0
    router_args: tuple[str, ...] = ()  # extra router flags, e.g. ("--max-ttft-ms", "2000")
    startup_timeout_s: float = 180.0
    env: dict[str, str] = field(default_factory=dict)
    tls: TLSFiles | None = None  # one certificate for every process (SANs of `host`), CA for mutual TLS
    otlp_traces_endpoint: str | None = None  # every process's --otlp-traces-endpoint (OTEL_* env: `env`)
    cluster_token_file: str | None = None  # the cluster credential (None: the launcher generates one)
    gpu_count: int = 0  # > 0: worker processes take GPUs 0..gpu_count-1 in turn (CUDA_VISIBLE_DEVICES)
    mooncake_master: bool = False  # start a local mooncake_master for the workers' --kv-store mooncake

    def __post_init__(self) -> None:
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError(
                f"need >= 1 prefill and >= 1 decode worker, got {self.num_prefill}, {self.num_decode}"
            )
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be >= 1, got {self.ep_size}")
        if self.gpu_count < 0:
            raise ValueError(f"gpu_count must be >= 0, got {self.gpu_count}")
        if self.eplb_config is not None and self.ep_size == 1:
            raise ValueError("--enable-eplb needs --ep > 1 (ClusterSpec: eplb_config needs ep_size > 1)")
        backend = transfer_backend_for(self.transfer_backend, self.tls is not None)
        object.__setattr__(self, "transfer_backend", backend)  # "auto" resolved

    @property
    def num_worker_processes(self) -> int:
        return (self.num_prefill + self.num_decode) * self.ep_size

    def router_args_for(
        self, host: str, port: int, grpc_port: int, redis_args: list[str], internal_port: int = 0
    ) -> list[str]:
        """`k2serve router ...` arguments, the same under every launcher (LocalCluster, RayCluster): it
        binds `host` with HTTP on `port`, the public gRPC API on `grpc_port` and the worker registry on
        `internal_port` (0: a free one) and keeps sessions in the Redis `redis_args` names
        (`RedisConnection.argv()`; empty: none); then the TLS files and cluster token, tracing, the extra
        `router_args`, the API key and the served model name. The ready file is the launcher's."""
        args = ["router", "--model", self.model_dir, "--host", host, "--port", str(port)]
        args += ["--grpc-port", str(grpc_port), "--internal-port", str(internal_port)]
        args += ["--heartbeat-timeout", str(self.heartbeat_timeout_s)]
        args += redis_args
        args += self.tls_args() + self.tracing_args()
        args += self.router_args
        if self.api_key:
            args += ["--api-key", self.api_key]
        if self.served_model_name:
            args += ["--served-model-name", self.served_model_name]
        return args

    def worker_args(
        self, role: str, worker_id: str, host: str, router: str, ep_rank: int = 0, ep_init: str | None = None
    ) -> list[str]:
        """`k2serve <role> ...` arguments of one worker process, the same under every launcher
        (LocalCluster, RayCluster): it binds `host` on a free port and registers with the router's
        internal listener at `router` as `worker_id`; with ep_size > 1 it is rank `ep_rank` of the group
        meeting at `ep_init` (tcp://HOST:PORT), with EPLB when `eplb_config` says. The TLS files and
        cluster token are included; the ready file is the launcher's."""
        args = [role, "--model", self.model_dir, "--dtype", self.dtype, "--host", host, "--port", "0"]
        args += ["--router", router, "--worker-id", worker_id]
        args += ["--transfer-backend", self.transfer_backend, *self.engine_args]
        if self.served_model_name:
            args += ["--served-model-name", self.served_model_name]
        if self.ep_size > 1:
            if ep_init is None:
                raise ValueError(f"worker {worker_id} of an EP group of {self.ep_size} needs ep_init")
            args += ["--ep", str(self.ep_size), "--ep-rank", str(ep_rank), "--ep-init", ep_init]
            if self.eplb_config is not None:
                args += ["--enable-eplb", "--eplb-config", self.eplb_config]
        return [*args, *self.tls_args(), *self.tracing_args()]

    def tracing_args(self) -> list[str]:
        """--otlp-traces-endpoint for every process (none without it: the OTEL_* variables still apply)."""
        return ["--otlp-traces-endpoint", self.otlp_traces_endpoint] if self.otlp_traces_endpoint else []

    def tls_args(self) -> list[str]:
        """The credential flags every process gets: the certificate (none without TLS) and the cluster
        token file (none without one)."""
        args = self.tls.argv() if self.tls is not None else []
        if self.cluster_token_file is not None:
            args += ["--cluster-token-file", self.cluster_token_file]
        return args


def start_embedded_redis(data_dir: Path) -> tuple[EmbeddedRedis, RedisConnection]:
    """The cluster's own Redis in `data_dir` (AOF on): on 127.0.0.1 only, with a password generated
    for this cluster that reaches the router in a 0600 file (`--redis-password-file`), never on a
    command line or in the environment. Returns the running server and how to connect to it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(32)
    password_file = data_dir / "password"
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password)
    server = EmbeddedRedis(RedisServerConfig(data_dir=data_dir, password=password)).start()
    return server, RedisConnection(f"redis://127.0.0.1:{server.port}/0", password_file=str(password_file))


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""


def gpu_env(process_index: int, gpu_count: int) -> dict[str, str]:
    """The environment that pins worker process `process_index` (in spawn order) to one GPU of
    `gpu_count`: GPUs are taken in turn, so the ranks of an expert-parallel group (spawned one after the
    other) land on distinct GPUs while there are at least as many GPUs as ranks, and the prefill and
    decode workers spread over the host instead of all opening cuda:0. Inside the process the GPU is
    cuda:0 (LOCAL_RANK 0). gpu_count 0: nothing set (CPU, or the user's own CUDA_VISIBLE_DEVICES)."""
    if gpu_count <= 0:
        return {}
    return {"CUDA_VISIBLE_DEVICES": str(process_index % gpu_count), "LOCAL_RANK": "0"}


class LocalCluster:
    def __init__(self, spec: ClusterSpec) -> None:
        self.dir = Path(spec.workdir or tempfile.mkdtemp(prefix="k2serve-up-"))
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        if spec.cluster_token_file is None:  # a fresh credential per cluster, readable by this user only
            token_file = self.dir / "cluster-token"
            write_token_file(token_file, secrets.token_urlsafe(32))
            spec = dataclasses.replace(spec, cluster_token_file=str(token_file))
        self.spec = spec
        self.procs: list[Proc] = []
        self.redis: EmbeddedRedis | None = None
        self.redis_connection: RedisConnection | None = spec.redis
        self.mooncake: MooncakeMaster | None = None  # the local Mooncake Store master (spec.mooncake_master)
        self.http_port = spec.port
        self.grpc_port = spec.grpc_port
        self.internal_port = spec.internal_port
        self._lifeline: Lifeline | None = None  # the processes die with this one (cluster.lifeline)
        self._workers_spawned = 0  # worker processes started so far: the next one's GPU (gpu_env)

    # ---- processes -------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> Proc:
        log = self.dir / "logs" / f"{name}.log"
        env = dict(os.environ) | self.spec.env | (extra_env or {}) | {"PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as f:
            popen = subprocess.Popen(  # noqa: S603, PLW1509 - our own CLI; preexec_fn: one prctl call
                [sys.executable, "-m", "k2serve", *args],
                stdout=f,
                stderr=subprocess.STDOUT,
                **self._line().popen_kwargs(env),
            )
        p = Proc(name, popen, log)
        self.procs.append(p)
        return p

    def _line(self) -> Lifeline:
        if self._lifeline is None:
            self._lifeline = Lifeline()
        return self._lifeline

    def _wait_file(self, proc: Proc, path: Path, deadline: float) -> str:
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().strip():
                return path.read_text().strip()
            if proc.popen.poll() is not None:
                raise ClusterError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
            time.sleep(0.05)
        raise ClusterError(
            f"{proc.name} did not become ready in {self.spec.startup_timeout_s:.0f} s:\n{proc.tail()}"
        )

    def start(self) -> LocalCluster:
        s = self.spec
        deadline = time.monotonic() + s.startup_timeout_s
        try:
            if s.use_redis and self.redis_connection is None:
                self.redis, self.redis_connection = start_embedded_redis(self.dir / "redis")
            elif self.redis_connection is not None:  # keep a password in the URL out of `ps`
                self.redis_connection = self.redis_connection.password_moved_to(self.dir / "redis-password")
            if s.mooncake_master and self.mooncake is None:
                self.start_mooncake_master()
            for stale in self.dir.glob("*.ready"):  # a reused workdir must not point at an old process
                stale.unlink()
            ready = self.dir / "router.ready"
            redis_args = self.redis_connection.argv() if self.redis_connection else []
            args = s.router_args_for(s.host, s.port, s.grpc_port, redis_args, s.internal_port)
            router = self._spawn("router", [*args, "--ready-file", str(ready)])
            self.http_port, self.grpc_port, self.internal_port = (
                int(x) for x in self._wait_file(router, ready, deadline).split()
            )
            for role, n in (("prefill", s.num_prefill), ("decode", s.num_decode)):
                for i in range(n):
                    self.spawn_worker(role, i)
            for p in self.procs[1:]:
                self._wait_file(p, self.dir / f"{p.name}.ready", deadline)
            self._wait_registered(s.num_worker_processes, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn_worker_process(self, name: str, args: list[str]) -> None:
        """One worker process, pinned to its GPU when the spec spreads workers over GPUs."""
        env = gpu_env(self._workers_spawned, self.spec.gpu_count)
        self._workers_spawned += 1
        self._spawn(name, [*args, "--ready-file", str(self.dir / f"{name}.ready")], env)

    def start_mooncake_master(self) -> None:
        """Start the cluster's mooncake_master (stopped by `stop`, after the workers) and hand its
        address to every worker from now on."""
        self.mooncake = MooncakeMaster().start()
        store = (
            "--kv-store-master",
            self.mooncake.address,
            "--kv-store-metadata",
            self.mooncake.metadata_url,
        )
        self.spec = dataclasses.replace(self.spec, engine_args=(*self.spec.engine_args, *store))

    def spawn_worker(self, role: str, i: int) -> None:
        """Start worker i of `role` (the planner's local connector adds workers to a running cluster
        this way): one process, or ep_size rank processes with a rendezvous of their own."""
        s = self.spec
        router = f"{s.host}:{self.internal_port}"
        if s.ep_size == 1:
            name = f"{role}-{i}"
            self._spawn_worker_process(name, s.worker_args(role, name, s.host, router))
            return
        init = f"tcp://{s.host}:{free_port(s.host)}"
        for r in range(s.ep_size):
            name = f"{role}-{i}-ep{r}"  # the worker id the rank registers under
            self._spawn_worker_process(name, s.worker_args(role, f"{role}-{i}", s.host, router, r, init))

    def _wait_registered(self, n: int, deadline: float) -> None:
        """Until `n` workers are registered and ready and the router says it is ready."""
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, OSError, ValueError):
                if sum(w["ready"] for w in self.workers()) >= n and router_ready(
                    self.http_url, self.spec.tls
                ):
                    return
            for p in self.procs:
                if p.popen.poll() is not None:
                    raise ClusterError(f"{p.name} exited with {p.popen.returncode}:\n{p.tail()}")
            time.sleep(0.1)
        raise ClusterError(f"workers did not all get ready in time; router log:\n{self.procs[0].tail()}")

    def workers(self) -> list[dict]:
        return registered_workers(self.http_url, self.spec.tls, self.spec.api_key)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        for p in self.procs:
            if p.name == name:
                p.popen.send_signal(sig)

    def stop(self, timeout: float = 24.0) -> None:
        """SIGTERM the router first (it drains: at most half of `timeout`), then the workers; SIGKILL
        what is left `timeout` seconds after the start (Kubernetes' default grace is 30 s). Then the
        lifeline is cut, so no child of this cluster outlives the call."""
        start = time.monotonic()
        for group, end in ((self.procs[:1], start + timeout / 2), (self.procs[1:], start + timeout)):
            for p in group:
                if p.popen.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.popen.send_signal(signal.SIGTERM)
            for p in group:
                try:
                    p.popen.wait(timeout=max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.popen.pid, signal.SIGKILL)
                    p.popen.wait()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
            self.redis_connection = self.spec.redis
        if self.mooncake is not None:
            self.mooncake.stop()
            self.mooncake = None
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None

    @property
    def http_url(self) -> str:
        scheme = "https" if self.spec.tls is not None else "http"
        return f"{scheme}://{self.spec.host}:{self.http_port}"

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def status_table(self) -> str:
        """One row per process: pid, state, metrics URL (the router's own /metrics; each worker's as
        registered, "-" while it is not), log."""
        metrics = metrics_urls(self.http_url, self.workers)
        rows = [("process", "pid", "state", "metrics", "log")]
        for p in self.procs:
            rows.append(
                (
                    p.name,
                    str(p.popen.pid),
                    "running" if p.popen.poll() is None else f"exit {p.popen.returncode}",
                    metrics.get(p.name) or "-",
                    str(p.log),
                )
            )
        if self.redis_connection:
            rows.append(
                ("redis", str(self.redis.pid) if self.redis else "-", self.redis_connection.where, "-", "-")
            )
        if self.mooncake is not None:
            rows.append(("mooncake_master", str(self.mooncake.pid), self.mooncake.address, "-", "-"))
        return text_table(rows)


def _verify(tls: TLSFiles | None) -> tuple[ssl.SSLContext | bool, dict[str, str]]:
    """httpx's `verify` and request extensions for the router's certificate (see registered_workers)."""
    if tls is None:
        return True, {}
    verify = ssl.create_default_context(cafile=tls.ca)
    return verify, {"sni_hostname": tls.server_name} if tls.server_name else {}


def router_ready(http_url: str, tls: TLSFiles | None) -> bool:
    """Whether the router's `GET /health/ready` answers 200 (it can serve a request); False when it
    answers otherwise or not at all."""
    verify, extensions = _verify(tls)
    try:
        with httpx.Client(verify=verify, timeout=5) as client:
            return client.get(f"{http_url}/health/ready", extensions=extensions).status_code == 200
    except httpx.HTTPError:
        return False


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as left-aligned columns two spaces apart (the first row is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def metrics_urls(http_url: str, workers: Callable[[], list[dict]]) -> dict[str, str]:
    """Process name -> its Prometheus URL for a status table: the router's own /metrics, and each
    registered worker's `metrics_url` as `/cluster/workers` lists it (keyed by worker id, which is the
    process name). A router that does not answer yet leaves only its own row."""
    urls = {"router": f"{http_url}/metrics"}
    with contextlib.suppress(OSError, ValueError, KeyError):
        urls |= {w["worker_id"]: w["metrics_url"] for w in workers()}
    return urls


def registered_workers(http_url: str, tls: TLSFiles | None, api_key: str | None = None) -> list[dict]:
    """The router's registered workers (`GET /cluster/workers`, with the first of the router's
    comma-separated `api_key`s when it has any). Over HTTPS
    the router's certificate is checked against `tls.ca` (the system roots without it) for the name
    `tls.server_name`, or the host of `http_url` when that is unset (as the processes check each
    other). Raises ConnectionError (an OSError) when the router does not answer with 200, ValueError on
    bad JSON."""
    verify, extensions = _verify(tls)
    try:
        with httpx.Client(verify=verify, timeout=5) as client:
            key = (api_key or "").split(",")[0].strip()
            headers = {"authorization": f"Bearer {key}"} if key else {}
            r = client.get(f"{http_url}/cluster/workers", headers=headers, extensions=extensions)
            r.raise_for_status()
            return r.json()["workers"]
    except httpx.HTTPError as e:  # callers poll a router that may be (re)starting: one OSError type
        raise ConnectionError(f"router at {http_url}: {e}") from e


def free_port(host: str) -> int:
    """A port free on `host` right now (the group's rank 0 binds it moments later)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _StopRequested(Exception):
    """SIGINT or SIGTERM arrived while `k2serve up` was starting the cluster."""


def run_local(spec: ClusterSpec) -> int:
    """`k2serve up`: start the cluster, print where to send requests, run until SIGINT/SIGTERM or until a
    process exits, then stop everything; the exit status (0). A signal while the cluster starts stops
    what was started at once (a load script may give up on a start that takes long)."""
    stop = {"now": False, "starting": True}

    def on_signal(signum: int, frame: object) -> None:
        stop["now"] = True
        if stop["starting"]:
            stop["starting"] = False  # once: a second signal must not interrupt the stopping
            raise _StopRequested(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster = LocalCluster(spec)
    print(
        f"starting k2serve: {spec.num_prefill} prefill + {spec.num_decode} decode workers"
        f"{f' of {spec.ep_size} EP ranks each' if spec.ep_size > 1 else ''} on {spec.model_dir} ...",
        flush=True,
    )
    try:
        cluster.start()
        stop["starting"] = False
    except _StopRequested:  # start() stopped what it had started (or it had just finished: stop it)
        cluster.stop()
        print("stopped before the cluster was ready.", flush=True)
        return 0
    try:
        print(cluster.status_table())
        print(f"\nready: OpenAI API {cluster.http_url}/v1  (e.g. curl {cluster.http_url}/v1/models)")
        print(
            f"       gRPC k2serve.v1.K2Serve at {spec.host}:{cluster.grpc_port}; Ctrl-C stops everything",
            flush=True,
        )
        while not stop["now"]:
            for p in cluster.procs:
                if p.popen.poll() is not None:
                    print(
                        f"{p.name} exited with {p.popen.returncode}; stopping the cluster\n{p.tail()}",
                        flush=True,
                    )
                    stop["now"] = True
            time.sleep(0.5)
    finally:
        print("stopping ...", flush=True)
        cluster.stop()
        print("stopped.", flush=True)
    return 0
