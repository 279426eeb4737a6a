"""The OpenTelemetry SDK behind `tracer.Tracer`: a TracerProvider of its own (no global one) with a
batching OTLP exporter, over HTTP (protobuf) or gRPC."""

from __future__ import annotations

import re
from collections.abc import Mapping

from typing_extensions import override

from k2serve.extras import MissingExtraError
from k2serve.tracing.settings import TracingSettings
from k2serve.tracing.tracer import Attr, Kind, Metadata, Span, Tracer

try:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
except ImportError as e:
    raise MissingExtraError("opentelemetry.sdk", "tracing", "--otlp-traces-endpoint / OTEL_*") from e

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_KINDS = {"internal": SpanKind.INTERNAL, "server": SpanKind.SERVER, "client": SpanKind.CLIENT}


def parent_context(traceparent: str) -> trace.Context | None:
    """The remote span a valid version-00 traceparent names (W3C Trace Context), else None (a new trace)."""
    m = TRACEPARENT.fullmatch(traceparent.strip().lower()) if traceparent else None
    if m is None:
        return None
    trace_id, span_id = int(m[1], 16), int(m[2], 16)
    if trace_id == 0 or span_id == 0:
        return None
    remote = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(m[3], 16)))
    return trace.set_span_in_context(NonRecordingSpan(remote))


class OtelSpan(Span):
    __slots__ = ("_span", "_tracer")

    def __init__(self, span: trace.Span, tracer: trace.Tracer) -> None:
        self._span = span
        self._tracer = tracer

    @property
    @override
    def traceparent(self) -> str:
        ctx = self._span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    @override
    def metadata(self) -> Metadata | None:
        return (("traceparent", self.traceparent),)

    @override
    def set(self, key: str, value: Attr) -> None:
        self._span.set_attribute(key, value)

    @override
    def child(
        self,
        name: str,
        *,
        kind: Kind = "internal",
        start_ns: int | None = None,
        attributes: Mapping[str, Attr] | None = None,
    ) -> Span:
        span = self._tracer.start_span(
            name,
            context=trace.set_span_in_context(self._span),
            kind=_KINDS[kind],
            attributes=attributes,
            start_time=start_ns,
        )
        return OtelSpan(span, self._tracer)

    @override
    def fail(self, error: BaseException) -> None:
        self._span.record_exception(error)
        self._span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))

    @override
    def end(self, end_ns: int | None = None) -> None:
        self._span.end(end_time=end_ns)


def make_exporter(settings: TracingSettings) -> SpanExporter:
    """The OTLP span exporter of settings.protocol (it reads OTEL_EXPORTER_OTLP_HEADERS and the like)."""
    if settings.protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as e:
            raise MissingExtraError("opentelemetry.exporter.otlp.proto.grpc", "tracing") from e
        insecure = settings.endpoint.startswith("http://")
        return OTLPSpanExporter(endpoint=settings.endpoint, insecure=insecure)
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter
    except ImportError as e:
        raise MissingExtraError("opentelemetry.exporter.otlp.proto.http", "tracing") from e
    return HTTPExporter(endpoint=settings.endpoint)


class OtelTracer(Tracer):
    enabled = True

    def __init__(self, settings: TracingSettings) -> None:
        self.settings = settings
        resource = Resource.create({"service.name": settings.service_name, "k2serve.role": settings.role})
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(
            BatchSpanProcessor(
                make_exporter(settings),
                schedule_delay_millis=settings.schedule_delay_ms,
                max_export_batch_size=settings.max_export_batch,
            )
        )
        self._tracer = self._provider.get_tracer("k2serve")

    @override
    def start(
        self,
        name: str,
        parent: str = "",
        *,
        kind: Kind = "internal",
        start_ns: int | None = None,
        attributes: Mapping[str, Attr] | None = None,
    ) -> Span:
        span = self._tracer.start_span(
            name,
            context=parent_context(parent),
            kind=_KINDS[kind],
            attributes=attributes,
            start_time=start_ns,
        )
        return OtelSpan(span, self._tracer)

    @override
    def shutdown(self) -> None:
        self._provider.shutdown()
