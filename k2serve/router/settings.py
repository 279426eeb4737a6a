"""The settings of the router process: a frozen dataclass the CLI builds from flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from k2serve.proto import registry_pb2
from k2serve.router.kv_index import DEFAULT_MAX_BLOCKS
from k2serve.router.policy import POLICIES
from k2serve.rpc.auth import InternalAuth
from k2serve.rpc.tls import TLSFiles
from k2serve.sessions.connection import RedisConnection
from k2serve.tracing.settings import TracingSettings

ROLE_OF = {"prefill": registry_pb2.WORKER_ROLE_PREFILL, "decode": registry_pb2.WORKER_ROLE_DECODE}


@dataclass(frozen=True)
class RouterSettings:
    """tls: HTTPS and TLS gRPC (with `tls.ca` gRPC callers must present a certificate it signed), and
    TLS channels to the workers; None: all plaintext.

    grpc_port serves the public K2Serve API (`api_key` enforced there as over HTTP); internal_port the
    worker registry, which only callers with the cluster credential `internal` reach (the default,
    `InternalAuth()`, refuses to exist: a router needs a token, mutual TLS or an explicit opt-out).
    `internal` also authenticates the router's calls to its workers.
    redis: the session store (None: sessions off); checked at startup (bad password or TLS: exit).
    tracing: where the router's spans go (OTLP); a caller's `traceparent` is continued.
    routing_policy: how workers are chosen (k2serve.router.policy.POLICIES; "kv": by predicted TTFT with
    the prefill workers' cached prefixes); kv_index_max_blocks bounds the KV index (hashes kept).
    routing_log: a file the router appends one JSON line per answered prefill to (the routing decision,
    its candidates as scored, the cached tokens predicted and found: backend.routing_record); None: off."""

    model_dir: str
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50051
    internal_port: int = 50052
    api_key: str | None = None
    static_workers: tuple[tuple[str, str], ...] = ()
    heartbeat_timeout_s: float = 5.0
    max_queue: int = 1024
    max_ttft_s: float | None = None
    tls: TLSFiles | None = None
    redis: RedisConnection | None = None
    ready_file: str | None = None
    tracing: TracingSettings | None = None  # None: no spans
    internal: InternalAuth = field(default_factory=InternalAuth)
    routing_policy: str = "kv"
    kv_index_max_blocks: int = DEFAULT_MAX_BLOCKS
    routing_log: str | None = None

    def __post_init__(self) -> None:
        if self.routing_policy not in POLICIES:
            raise ValueError(
                f"--routing-policy must be one of {', '.join(POLICIES)}, got {self.routing_policy!r}"
            )
        if self.kv_index_max_blocks < 1:
            raise ValueError(f"--kv-index-max-blocks must be >= 1, got {self.kv_index_max_blocks}")
        if self.heartbeat_timeout_s <= 0:
            raise ValueError(f"--heartbeat-timeout must be > 0, got {self.heartbeat_timeout_s}")
        for role, addr in self.static_workers:
            host, _, port = addr.rpartition(":")
            if role not in ROLE_OF or not host or not port.isdecimal() or not 0 < int(port) < 65536:
                raise ValueError(f"--worker {role}={addr}: expected prefill=HOST:PORT or decode=HOST:PORT")
