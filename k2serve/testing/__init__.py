"""Harnesses for tests and benchmarks (never imported by the server): an API app served on a background
thread, and hosts simulated with Linux network namespaces."""
