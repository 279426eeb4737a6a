"""Protobuf and gRPC definitions for everything that crosses a process boundary.

Edit the .proto files, then run `python scripts/gen_proto.py`; the generated *_pb2*.py are committed.
"""
