"""A worker's metrics endpoint: its registry on a free port at the URL it registers, over HTTPS with the
worker's certificate when it has one (verified against the CA; no client certificate asked), closed on stop."""

from __future__ import annotations

import ssl

import httpx
import pytest
from conftest import PKI
from prometheus_client import CollectorRegistry, Counter

from k2serve.engine.config import EngineConfig
from k2serve.rpc.auth import InternalAuth
from k2serve.worker.metrics_server import MetricsServer
from k2serve.worker.settings import WorkerSettings


def settings(**kw: object) -> WorkerSettings:
    return WorkerSettings(
        role="decode",
        model_dir="unused",
        model_name="m",
        dtype="float32",
        engine=EngineConfig(),
        internal=InternalAuth(insecure=True),  # no internal service here
        **kw,
    )  # type: ignore[arg-type]


def registry() -> CollectorRegistry:
    r = CollectorRegistry()
    Counter("vllm:generation_tokens", "Tokens generated.", registry=r).inc(7)
    return r


def test_plain_http_on_a_free_port() -> None:
    server = MetricsServer(settings(), registry())
    try:
        assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/metrics")
        assert "vllm:generation_tokens_total 7.0" in httpx.get(server.url, timeout=5).text
    finally:
        server.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url, timeout=2)


def test_https_with_the_workers_certificate(pki: PKI) -> None:
    server = MetricsServer(settings(tls=pki.files, advertise_host="localhost"), registry())
    try:
        assert server.url.startswith("https://localhost:")
        ctx = ssl.create_default_context(cafile=str(pki.ca))  # no client certificate presented
        assert "vllm:generation_tokens_total 7.0" in httpx.get(server.url, verify=ctx, timeout=5).text
        with pytest.raises(httpx.TransportError):  # not served in plaintext
            httpx.get(server.url.replace("https", "http"), timeout=2)
        assert httpx.get(server.url, verify=ctx, timeout=5).status_code == 200  # and still serving
    finally:
        server.close()


def test_port_is_checked() -> None:
    with pytest.raises(ValueError, match="--metrics-port"):
        settings(metrics_port=70000)
