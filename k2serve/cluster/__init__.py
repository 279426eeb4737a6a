"""Launchers: the local multi-process cluster (`k2serve up`), the embedded Redis, and the Ray runtime."""
