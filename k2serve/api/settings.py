"""The settings of `k2serve serve` (one process: the engine behind the HTTP API), built by the CLI."""

from __future__ import annotations

from dataclasses import dataclass

from k2serve.engine.config import EngineConfig


@dataclass(frozen=True)
class ServeSettings:
    """model_dir: the checkpoint, loaded in `dtype` (a torch dtype's name); model_name: its name in the
    API (None: the directory's name).
    api_key: required bearer key(s), comma-separated (None: the API is open). tls_cert / tls_key: serve
    HTTPS with this PEM pair (both or neither)."""

    model_dir: str
    engine: EngineConfig
    model_name: str | None = None
    dtype: str = "float32"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
