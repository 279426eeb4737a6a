"""Protobuf and gRPC definitions for everything that crosses a process boundary."""
