"""KV-transfer throughput of each backend vs a raw loopback TCP socket, between two processes.

    python benchmarks/bench_transfer.py                      # K2 defaults: 61 layers x 4096 tokens x 576, bf16
    python benchmarks/bench_transfer.py --tokens 1024 --backends torch --repeats 5

The receiver runs in this process and puts every layer into a preallocated [layers, tokens, kv_dim]
tensor, as a decode worker puts it into its paged pool: the torch backend receives into it in place
(and, as a second row, through its staging buffers and an on_layer copy); gRPC delivers through
on_layer's copy. The sender runs in a spawned process and sends the layers back to back. GB/s = payload bytes / receiver time from the first chunk to the last layer
(best of --repeats); the socket baseline moves the same bytes with sendall / recv_into the destination,
and runs first and last (the best of both is the baseline) to bracket noise from other work on the machine.
Torch runs with --torch-threads intra-op threads (default 1): on a 2-core machine OpenMP workers that
spin after the on_layer copy steal the cores the transfer needs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shlex
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from k2serve.transfer import BACKENDS, make_receiver, make_sender
from k2serve.transfer.base import DTYPES


def _layers(args: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(args.layers, args.tokens, args.kv_dim, generator=g).to(DTYPES[args.dtype])


def _socket_sender(port: int, args: argparse.Namespace, ready: Any) -> None:
    torch.set_num_threads(args.torch_threads)
    kv = _layers(args)
    ready.put("ready")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(args.repeats):
            for layer in range(args.layers):
                sock.sendall(kv[layer].view(torch.uint8).numpy())
            sock.recv(1)  # the receiver's go-ahead for the next repeat


def _bench_socket(args: argparse.Namespace, dest: torch.Tensor) -> float:
    """Best seconds to move all layers through one loopback TCP connection."""
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    with socket.create_server(("127.0.0.1", 0)) as server:
        child = ctx.Process(target=_socket_sender, args=(server.getsockname()[1], args, ready), daemon=True)
        child.start()
        try:
            ready.get(timeout=60)
            conn, _ = server.accept()
            with conn:
                best = float("inf")
                for _ in range(args.repeats):
                    start = None
                    for layer in range(args.layers):
                        view = memoryview(dest[layer].view(torch.uint8).numpy()).cast("B")
                        got = 0
                        while got < len(view):
                            n = conn.recv_into(view[got:])
                            if n == 0:
                                raise ConnectionError("socket sender closed early")
                            start = start or time.perf_counter()
                            got += n
                    best = min(best, time.perf_counter() - start)  # type: ignore[operator]
                    conn.sendall(b"k")
        finally:
            child.join(10)
            if child.is_alive():
                child.kill()
    return best


def _backend_sender(backend: str, endpoint: str, args: argparse.Namespace, done: Any) -> None:
    torch.set_num_threads(args.torch_threads)
    kv = _layers(args)
    sender = make_sender(backend, endpoint)
    try:
        for rep in range(args.repeats):
            tid = f"bench-{rep}"
            sender.open(tid, args.layers, args.tokens, args.kv_dim, kv.dtype)
            for layer in range(args.layers):
                sender.send_layer(tid, layer, kv[layer])
            done.put(sender.close(tid, timeout=120).seconds)
    finally:
        sender.shutdown()


def _bench_backend(backend: str, args: argparse.Namespace, dest: torch.Tensor, in_place: bool) -> float:
    """Best receiver-side seconds (first chunk to last layer) for one transfer of all layers."""
    receiver = make_receiver(backend)
    for rep in range(args.repeats):
        receiver.expect(
            f"bench-{rep}",
            args.layers,
            args.tokens,
            args.kv_dim,
            dest.dtype,
            lambda i, kv: dest[i].copy_(kv),
            place=(lambda i: dest[i]) if in_place else None,
        )
    ctx = mp.get_context("spawn")
    done = ctx.Queue()
    child = ctx.Process(target=_backend_sender, args=(backend, receiver.endpoint, args, done), daemon=True)
    child.start()
    try:
        return min(receiver.wait(f"bench-{rep}", timeout=120).seconds for rep in range(args.repeats))
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
        receiver.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--kv-dim", type=int, default=576)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated subset of " + str(BACKENDS)
    )
    parser.add_argument("--repeats", type=int, default=3, help="transfers per method; the best is reported")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch intra-op threads in both processes"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    argv_used = list(argv) if argv is not None else sys.argv[1:]

    layer_bytes = args.tokens * args.kv_dim * DTYPES[args.dtype].itemsize
    total = args.layers * layer_bytes
    print(f"moving {args.layers} layers x {args.tokens} tokens x {args.kv_dim} {args.dtype}")
    print(f"  = {layer_bytes:,} bytes per layer, {total:,} bytes ({total / 1e9:.3f} GB) per transfer")
    expected = _layers(args)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[expected.element_size()]
    dest = torch.zeros_like(expected)

    # (label, backend, in place): the torch backend receives into the destination itself (as into
    # a decode worker's pool) and, for comparison, through its staging buffers and on_layer's copy.
    methods = [(f"{b} (in place)" if b == "torch" else b, b, b == "torch") for b in args.backends.split(",")]
    if "torch" in args.backends.split(","):
        methods.append(("torch (staged)", "torch", False))
    results: dict[str, float] = {}
    first_socket = total / _bench_socket(args, dest) / 1e9
    for label, backend, in_place in methods:
        dest.zero_()
        results[label] = total / _bench_backend(backend, args, dest, in_place) / 1e9
        if not torch.equal(dest.view(bits), expected.view(bits)):
            raise AssertionError(f"{label}: received tensors differ from the sent ones")
    last_socket = total / _bench_socket(args, dest) / 1e9
    base = max(first_socket, last_socket)
    print(
        f"{'raw TCP socket':>17}: {base:6.2f} GB/s  (baseline; first {first_socket:.2f}, last {last_socket:.2f})"
    )
    for label, gbps in results.items():
        print(f"{label:>17}: {gbps:6.2f} GB/s  ratio to socket {gbps / base:.2f} (target >= 0.70)")
    print("reproduce: k2serve bench transfer " + shlex.join(argv_used))
    return 0


if __name__ == "__main__":
    sys.exit(main())
