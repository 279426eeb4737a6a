"""Launchers: the local multi-process cluster, the embedded Redis, and the Ray runtime."""
