"""`k2serve serve`: one process running the engine behind the OpenAI-compatible API, with agent sessions
(`/v1/sessions`, chat `session_id`, Responses `previous_response_id`) in the process's memory.

The first SIGTERM or SIGINT starts a drain: new requests get 503 while in-flight ones finish (for at
most DRAIN_TIMEOUT_S seconds), then uvicorn shuts down as usual and the process exits with status 0.
A second signal exits at once.
"""

from __future__ import annotations

import time
from types import FrameType

import torch
import uvicorn

from k2serve.api.openai_app import build_app
from k2serve.api.settings import ServeSettings
from k2serve.engine.async_engine import AsyncEngine
from k2serve.sessions.memory import InMemorySessionStore
from k2serve.sessions.service import SessionService

DRAIN_TIMEOUT_S = 60.0


class DrainingServer(uvicorn.Server):
    """uvicorn whose first exit signal drains `backend` before shutting down (see the module doc).

    The signal handler only records the signal; the drain starts on uvicorn's next tick (every
    0.1 s) in the event loop. The signal is not re-raised after shutdown, unlike plain uvicorn.
    """

    def __init__(
        self, config: uvicorn.Config, backend: AsyncEngine, drain_timeout_s: float = DRAIN_TIMEOUT_S
    ) -> None:
        super().__init__(config)
        self._backend = backend
        self._drain_timeout_s = drain_timeout_s
        self._signalled = False
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled:
            self.should_exit = True
            self.force_exit = True
        self._signalled = True

    async def on_tick(self, counter: int) -> bool:
        if self._signalled and self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self._drain_timeout_s
            self._backend.begin_drain()
        if self._drain_deadline is not None and not self.should_exit:
            self.should_exit = self._backend.num_in_flight == 0 or time.monotonic() > self._drain_deadline
        return await super().on_tick(counter)


def serve(settings: ServeSettings) -> int:
    """Run `k2serve serve` until a signal (see the module docstring); the exit status."""
    backend = AsyncEngine.from_pretrained(
        settings.model_dir,
        getattr(torch, settings.dtype),
        settings.engine,
        model_name=settings.model_name,
    )
    config = uvicorn.Config(
        build_app(backend, settings.api_key, sessions=SessionService(InMemorySessionStore())),
        host=settings.host,
        port=settings.port,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        log_level="info",
        timeout_graceful_shutdown=int(DRAIN_TIMEOUT_S),
    )
    server = DrainingServer(config, backend)
    backend.start()
    try:
        server.run()
    finally:
        backend.shutdown()
    return 0
