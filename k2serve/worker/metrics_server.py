"""A worker's Prometheus endpoint: its engine's registry on a port of its own (HTTPS with the worker's
certificate when it has one; scrapes need no client certificate, as Prometheus presents none by default)."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.registry import CollectorRegistry

from k2serve.worker.settings import WorkerSettings


class MetricsServer:
    """Serves `registry` on settings.host:settings.metrics_port (0 = a free port) until `close()`."""

    def __init__(self, settings: WorkerSettings, registry: CollectorRegistry) -> None:
        tls = settings.tls
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(
            settings.metrics_port,
            settings.host,
            registry,
            certfile=tls.cert if tls else None,
            keyfile=tls.key if tls else None,
        )
        port = self._server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://{settings.advertised(port)}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
