"""Readiness tells the truth: a router is live at once but ready (HTTP /health/ready, /health, the gRPC
health service) only while a ready prefill and a ready decode worker are registered; a request before
then gets 503 with Retry-After (gRPC UNAVAILABLE), never 500. A worker reports itself ready only after
its model is loaded and a warm-up step ran, and the router routes nothing to a worker not ready."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import grpc_server_in_thread
from grpc_health.v1 import health_pb2, health_pb2_grpc

from k2serve.cluster.local import Proc
from k2serve.proto import api_pb2, api_pb2_grpc, registry_pb2, registry_pb2_grpc
from k2serve.rpc.auth import CLUSTER_TOKEN_HEADER, write_token_file

pytestmark = pytest.mark.timeout(240)
STARTUP_S = 120.0
REGISTRY = "k2serve.internal.v1.WorkerRegistry"
API = "k2serve.v1.K2Serve"
DECODE, PREFILL = registry_pb2.WORKER_ROLE_DECODE, registry_pb2.WORKER_ROLE_PREFILL


@contextlib.contextmanager
def k2serve_process(workdir: Path, name: str, args: list[str]) -> Iterator[tuple[Proc, str]]:
    """`k2serve <args> --ready-file F`: yields the process and what it wrote to F; always stopped."""
    ready, log = workdir / f"{name}.ready", workdir / f"{name}.log"
    with open(log, "wb") as f:
        popen = subprocess.Popen(
            [sys.executable, "-m", "k2serve", *args, "--ready-file", str(ready)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=dict(os.environ) | {"PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    proc = Proc(name, popen, log)
    try:
        deadline = time.monotonic() + STARTUP_S
        while not (ready.exists() and ready.read_text().strip()):
            assert popen.poll() is None, f"{name} exited with {popen.returncode}:\n{proc.tail()}"
            assert time.monotonic() < deadline, f"{name} not ready in {STARTUP_S:.0f} s:\n{proc.tail()}"
            time.sleep(0.05)
        yield proc, ready.read_text().strip()
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()


def health(channel: grpc.Channel, service: str) -> int:
    check = health_pb2_grpc.HealthStub(channel).Check
    return check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_for(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_router_without_ready_workers_is_live_but_not_ready(tiny_ckpt: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "cluster-token"
    write_token_file(token_file, secrets.token_urlsafe(32))
    token = [(CLUSTER_TOKEN_HEADER, token_file.read_text().strip())]
    args = ["router", "--model", str(tiny_ckpt), "--host", "127.0.0.1", "--port", "0", "--grpc-port", "0"]
    args += ["--internal-port", "0", "--cluster-token-file", str(token_file)]
    with k2serve_process(tmp_path, "router", [*args, "--heartbeat-timeout", "60"]) as (router, ports):
        http_port, grpc_port, internal_port = ports.split()
        url = f"http://127.0.0.1:{http_port}"
        assert httpx.get(f"{url}/health/live").status_code == 200
        for path in ("/health/ready", "/health"):
            r = httpx.get(f"{url}{path}")
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, (path, r.text)
            assert r.json() == {
                "status": "unavailable",
                "ready": False,
                "missing": ["prefill worker", "decode worker"],
            }

        def completion_refused(missing: str) -> None:
            r = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2}, timeout=30)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("service_unavailable", "no_worker"), error
            assert f"no ready {missing}" in error["message"], error

        completion_refused("prefill worker")
        with (
            grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
            grpc.insecure_channel(f"127.0.0.1:{internal_port}") as internal,
        ):
            with pytest.raises(grpc.RpcError) as err:
                list(
                    api_pb2_grpc.K2ServeStub(channel).Generate(api_pb2.GenerateRequest(text="hi"), timeout=30)
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
            assert health(channel, "") == health(channel, API) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert health(internal, REGISTRY) == health_pb2.HealthCheckResponse.SERVING

            # Workers that registered but are still warming up: listed, not ready, sent nothing.
            registry = registry_pb2_grpc.WorkerRegistryStub(internal)
            for worker_id, role, port in (("p0", PREFILL, 1), ("d0", DECODE, 2)):
                info = registry_pb2.WorkerInfo(
                    worker_id=worker_id, role=role, grpc_address=f"127.0.0.1:{port}"
                )
                registry.Register(info, timeout=5, metadata=token)
            listed = httpx.get(f"{url}/cluster/workers").json()["workers"]
            assert {(w["worker_id"], w["ready"]) for w in listed} == {("p0", False), ("d0", False)}
            assert httpx.get(f"{url}/health/ready").json()["missing"] == ["prefill worker", "decode worker"]
            completion_refused("prefill worker")  # 503, not a call to the unready worker's dead address

            def beat(worker_id: str) -> None:
                req = registry_pb2.HeartbeatRequest(worker_id=worker_id, ready=True)
                assert registry.Heartbeat(req, timeout=5, metadata=token).known

            beat("d0")
            assert httpx.get(f"{url}/health/ready").json()["missing"] == ["prefill worker"]
            beat("p0")
            r = httpx.get(f"{url}/health/ready")
            assert (r.status_code, r.json()) == (200, {"status": "ok", "ready": True})
            assert httpx.get(f"{url}/health").status_code == 200
            wait_for(lambda: health(channel, "") == health_pb2.HealthCheckResponse.SERVING)
            assert health(channel, API) == health_pb2.HealthCheckResponse.SERVING

            registry.Deregister(registry_pb2.DeregisterRequest(worker_id="p0"), timeout=5, metadata=token)
            r = httpx.get(f"{url}/health/ready")
            assert r.status_code == 503 and r.json()["missing"] == ["prefill worker"]
            wait_for(lambda: health(channel, "") == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert router.popen.poll() is None


class RecordingRegistry(registry_pb2_grpc.WorkerRegistryServicer):
    """A router's registry that records what a worker tells it, in order: ("register" | "heartbeat", ready)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    async def Register(  # noqa: N802
        self, request: registry_pb2.WorkerInfo, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RegisterResponse:
        self.seen.append(("register", request.ready))
        return registry_pb2.RegisterResponse(heartbeat_interval_ms=200, lease_ms=60_000)

    async def Heartbeat(  # noqa: N802
        self, request: registry_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.HeartbeatResponse:
        self.seen.append(("heartbeat", request.ready))
        return registry_pb2.HeartbeatResponse(known=True)

    async def Deregister(  # noqa: N802
        self, request: registry_pb2.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeregisterResponse:
        return registry_pb2.DeregisterResponse()


def test_a_worker_registers_unready_and_reports_ready_after_its_warm_up(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    """The worker registers as soon as it serves gRPC (not ready: its warm-up step runs), says ready in
    the heartbeat right after the warm-up, and its gRPC health turns SERVING only then."""
    registry = RecordingRegistry()
    with grpc_server_in_thread(
        lambda server: registry_pb2_grpc.add_WorkerRegistryServicer_to_server(registry, server)
    ) as fake_router:
        args = ["decode", "--model", str(tiny_ckpt), "--dtype", "float32", "--host", "127.0.0.1"]
        args += ["--port", "0", "--router", fake_router.target, "--worker-id", "d0", "--insecure-internal"]
        args += ["--transfer-backend", "grpc", "--kv-cache-mb", "16", "--block-size", "8"]
        with k2serve_process(tmp_path, "decode", args) as (worker, address):  # ready file: after warm-up
            wait_for(lambda: ("heartbeat", True) in registry.seen, timeout=30)
            seen = list(registry.seen)
            assert seen[0] == ("register", False), seen  # registered while warming up
            first_ready = seen.index(("heartbeat", True))
            assert all(not ready for _, ready in seen[:first_ready]), seen
            assert all(ready for _, ready in seen[first_ready:]), seen  # never unready again
            log = worker.log.read_text()
            assert log.index("serving gRPC") < log.index("worker d0 ready"), log
            with grpc.insecure_channel(address) as channel:
                assert health(channel, "") == health_pb2.HealthCheckResponse.SERVING
