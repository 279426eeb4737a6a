"""OpenTelemetry tracing of a request across the cluster: spans, W3C `traceparent` propagation, OTLP export.
Off and free (no SDK import) unless an OTLP endpoint is configured (`settings.py`)."""
