"""The settings of one prefill or decode worker process: a frozen dataclass the CLI builds from flags."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field

import torch

from k2serve.engine.config import EngineConfig, resolve_device
from k2serve.experts.comm import local_ep_device, parse_init_method
from k2serve.experts.eplb import EPLBConfig
from k2serve.proto import registry_pb2
from k2serve.rpc.auth import InternalAuth
from k2serve.rpc.tls import TLSFiles, transfer_backend_for
from k2serve.tracing.settings import TracingSettings

ROLES = {"prefill": registry_pb2.WORKER_ROLE_PREFILL, "decode": registry_pb2.WORKER_ROLE_DECODE}


@dataclass(frozen=True)
class WorkerSettings:
    """One worker process. `router` None: run standalone (listed statically by the router).

    tls: serve and dial every gRPC hop (router, peers, KV transfer) over TLS, mutual with `tls.ca`;
    the torch transfer backend has no TLS and is refused with it.

    internal: the cluster credential its servers require (PrefillWorker/DecodeWorker, the gRPC KV
    receiver) and its calls carry (to the router, to decode workers); the default, `InternalAuth()`,
    refuses to exist without a token or mutual TLS (k2serve.rpc.auth).

    ep_size > 1: this process is rank `ep_rank` of an expert-parallel group that meets at `ep_init`
    ('tcp://host:port', hosted by rank 0); it loads only its own experts, serves and registers as its
    own worker (`worker_id` ends in `-ep<rank>`). ep_timeout_s bounds every collective of the group.
    eplb: re-place the group's experts while serving (--enable-eplb / --eplb-config); None: off.
    """

    role: str
    model_dir: str
    model_name: str
    dtype: str
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    router: str | None = None
    worker_id: str = field(default_factory=lambda: f"w-{uuid.uuid4().hex[:8]}")
    transfer_backend: str = "auto"  # "auto": torch, or grpc with TLS (torch.distributed has no TLS)
    transfer_port: int = 0
    metrics_port: int = 0  # Prometheus endpoint (0 = a free port); its URL is registered as metrics_url
    heartbeat_interval_s: float = 1.0
    drain_timeout_s: float = 60.0  # on SIGTERM: how long running requests may take to finish
    ready_file: str | None = None
    ep_size: int = 1
    ep_rank: int = 0
    ep_init: str | None = None
    ep_timeout_s: float = 60.0
    eplb: EPLBConfig | None = None
    tls: TLSFiles | None = None
    tracing: TracingSettings | None = None  # where spans go (OTLP); None: none
    internal: InternalAuth = field(default_factory=InternalAuth)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {self.role!r}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"--metrics-port must be in [0, 65535], got {self.metrics_port}")
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat interval must be > 0 s, got {self.heartbeat_interval_s}")
        if self.ep_size < 1:
            raise ValueError(f"--ep must be >= 1, got {self.ep_size}")
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"--ep-rank must be in [0, {self.ep_size}), got {self.ep_rank}")
        if self.ep_size > 1:
            if self.ep_init is None:
                raise ValueError(f"--ep {self.ep_size} needs --ep-init tcp://HOST:PORT (rank 0's address)")
            parse_init_method(self.ep_init)  # EPConfigError (a ValueError) names a malformed one
        if self.ep_timeout_s <= 0:
            raise ValueError(f"--ep-timeout must be > 0 s, got {self.ep_timeout_s}")
        if self.eplb is not None:
            if self.ep_size == 1:
                raise ValueError("--enable-eplb needs --ep > 1 (one rank holds every expert)")
            self.eplb.redundant_per_rank(self.ep_size)  # EPConfigError unless --ep divides the replicas
        device = resolve_device(self.engine.device, check_available=False) if self.engine.device else None
        if self.ep_size > 1 and device is not None and device.type == "cuda":
            # each rank of the group (its attention, KV pool and experts) on its own GPU; NCCL collectives
            rank_device = str(local_ep_device(device, self.ep_rank))
            object.__setattr__(self, "engine", dataclasses.replace(self.engine, device=rank_device))
        backend = transfer_backend_for(self.transfer_backend, self.tls is not None)
        object.__setattr__(self, "transfer_backend", backend)  # "auto" resolved

    @property
    def kv_device(self) -> torch.device:
        """Where this worker's KV pool is, so where the torch KV transfer sends from or receives into
        (gloo on CPU, NCCL point to point when CUDA): the engine's device (an EP rank's own GPU)."""
        return self.engine.torch_device

    def kv_transfer_options(self) -> dict[str, object]:
        """The torch backend's options: its `device` (gRPC always moves host bytes, its outbox copies a
        CUDA layer to the host itself) and the cluster `token` every pair connection proves
        (transfer/handshake.py; gRPC carries it as call metadata instead). A decode worker's receiver
        gets them when it receives over torch; a prefill worker's senders always (they use the backend
        each decode worker names), unless under TLS (then no torch sender is made)."""
        receives_torch = self.role == "decode" and self.transfer_backend == "torch"
        if not (receives_torch or (self.role == "prefill" and self.tls is None)):
            return {}
        return {"device": self.kv_device, "token": self.internal.token}

    def advertised(self, port: int) -> str:
        return f"{self.advertise_host or self.host}:{port}"
