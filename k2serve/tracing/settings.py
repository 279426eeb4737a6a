"""Where traces go: `TracingSettings` from the standard OTEL_* environment variables or
`--otlp-traces-endpoint` (the CLI calls `TracingSettings.resolve`); None means tracing is off.

Read here (https://opentelemetry.io/docs/specs/otel/protocol/exporter/):
- OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: the traces URL, used as given;
- OTEL_EXPORTER_OTLP_ENDPOINT: the base URL; with http/protobuf "/v1/traces" is appended;
- OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else OTEL_EXPORTER_OTLP_PROTOCOL: "http/protobuf" (default) or "grpc";
- OTEL_SERVICE_NAME (default "k2serve-<role>");
- OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none: off, whatever else is set.
The exporters themselves read the rest (OTEL_EXPORTER_OTLP_HEADERS, _CERTIFICATE, _TIMEOUT, _COMPRESSION).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

PROTOCOLS = ("http/protobuf", "grpc")
ROLES = ("router", "prefill", "decode")


@dataclass(frozen=True)
class TracingSettings:
    """endpoint: the OTLP traces URL (http/protobuf: the full URL, e.g. http://host:4318/v1/traces;
    grpc: http://host:4317, plaintext, or https://... for TLS). service_name: the resource's
    service.name. max_export_batch: spans per export request; schedule_delay_ms: how long spans wait
    for a batch to fill."""

    endpoint: str
    protocol: str = "http/protobuf"
    service_name: str = "k2serve"
    role: str = "router"
    schedule_delay_ms: int = 500
    max_export_batch: int = 512

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"OTLP protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.role not in ROLES:
            raise ValueError(f"tracing role must be one of {ROLES}, got {self.role!r}")
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(
                f"OTLP traces endpoint must be an http:// or https:// URL, got {self.endpoint!r}"
            )
        if self.schedule_delay_ms <= 0 or self.max_export_batch <= 0:
            raise ValueError(
                f"schedule_delay_ms and max_export_batch must be > 0, got "
                f"{self.schedule_delay_ms}, {self.max_export_batch}"
            )

    @classmethod
    def resolve(cls, role: str, endpoint: str | None, env: Mapping[str, str]) -> TracingSettings | None:
        """The settings of a `role` process from its `--otlp-traces-endpoint` (`endpoint`, winning
        over the environment) and the OTEL_* variables in `env`; None when tracing is off."""
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
            return None
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or PROTOCOLS[0]
        ).strip()
        url = endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if not url and (base := env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
            url = base if protocol == "grpc" else base.rstrip("/") + "/v1/traces"
        if not url:
            return None
        name = env.get("OTEL_SERVICE_NAME") or f"k2serve-{role}"
        return cls(endpoint=url.strip(), protocol=protocol, service_name=name, role=role)
