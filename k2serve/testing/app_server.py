"""Run an API app in a background thread, for tests and benchmarks (`with serve_in_thread(app) as url`)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI


class ServerStartError(RuntimeError):
    """uvicorn did not start within the timeout; `timeout_s` is it."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"uvicorn did not start within {timeout_s} s")
        self.timeout_s = timeout_s


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", start_timeout_s: float = 30.0) -> Iterator[str]:
    """Serve `app` on a free port of `host`; yields the base URL ("http://host:port"). The server is
    always stopped (in-flight responses are given up to 10 s) and the thread joined on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=10)
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ServerStartError(start_timeout_s)
            time.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
