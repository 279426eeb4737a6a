"""The spans k2serve records, behind a small interface whose default does nothing.

`Tracer.start` opens a span (a root, or the child of a remote parent given as a W3C `traceparent`
value); `Span.child` opens one inside it; `Span.end` closes it, at an explicit time when the operation
was measured elsewhere (`epoch_ns`). `Span.metadata()` is what a gRPC call carries so that the callee's
spans join the trace. `NOOP` (tracing off) imports nothing and allocates nothing per span: every
`start` and `child` returns the one `NOOP_SPAN`. `make_tracer(settings)` builds the OpenTelemetry one
(`otel.py`) only when settings are given.

Contract: a span is ended once, by whoever opened it; `child` of an ended span is allowed (it joins
the trace as that span's child). Methods are thread-safe (the engine thread ends per-layer spans).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from k2serve.tracing.settings import TracingSettings

Kind = Literal["internal", "server", "client"]
Attr = str | int | float | bool
Metadata = tuple[tuple[str, str], ...]


class Span:
    """A span; this base class is the no-op one."""

    __slots__ = ()

    @property
    def traceparent(self) -> str:
        """This span as a W3C traceparent value ("00-<trace id>-<span id>-<flags>"); "" when off."""
        return ""

    def metadata(self) -> Metadata | None:
        """gRPC metadata that makes the callee's spans children of this one; None when off."""
        return None

    def set(self, key: str, value: Attr) -> None:
        """Set an attribute."""

    def child(
        self,
        name: str,
        *,
        kind: Kind = "internal",
        start_ns: int | None = None,
        attributes: Mapping[str, Attr] | None = None,
    ) -> Span:
        """Open a span inside this one (starting now, or at `start_ns`, ns since the epoch)."""
        return self

    def fail(self, error: BaseException) -> None:
        """Mark the span failed with `error` (its status and an exception event)."""

    def end(self, end_ns: int | None = None) -> None:
        """Close the span now, or at `end_ns` (ns since the epoch)."""

    def __enter__(self) -> Span:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        """`with span:` ends it, failed when an exception leaves the block."""
        if exc is not None:
            self.fail(exc)
        self.end()


NOOP_SPAN = Span()


class Tracer:
    """Opens root spans of one process; this base class is tracing off."""

    enabled = False

    def start(
        self,
        name: str,
        parent: str = "",
        *,
        kind: Kind = "internal",
        start_ns: int | None = None,
        attributes: Mapping[str, Attr] | None = None,
    ) -> Span:
        """Open a span: the child of `parent` (a W3C traceparent value from a caller) when it is a valid
        one, else the root of a new trace."""
        return NOOP_SPAN

    def shutdown(self) -> None:
        """Export the spans still buffered and stop (at process exit)."""


NOOP = Tracer()


def make_tracer(settings: TracingSettings | None) -> Tracer:
    """NOOP without settings; else the OpenTelemetry tracer exporting to settings.endpoint (needs the
    `tracing` extra: MissingExtraError otherwise)."""
    if settings is None:
        return NOOP
    from k2serve.tracing.otel import OtelTracer  # the SDK is imported only when tracing is on

    return OtelTracer(settings)


def epoch_ns(perf_counter_s: float) -> int:
    """A `time.perf_counter()` reading as ns since the epoch (what span times are)."""
    return time.time_ns() - round((time.perf_counter() - perf_counter_s) * 1e9)
