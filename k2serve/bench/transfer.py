"""KV-transfer throughput of each backend vs a raw loopback TCP socket, between two processes.

    k2serve bench transfer                          # K2 defaults: 61 layers x 4096 tokens x 576, bf16
    k2serve bench transfer --tokens 1024 --backends torch --repeats 5
    k2serve bench transfer --tokens 256,1024,4096   # one table per size (prompt length)

The receiver runs in this process and puts every layer into a preallocated [layers, tokens, kv_dim]
tensor, as a decode worker puts it into its paged pool: the torch backend receives into it in place
(and, as a second row, through its staging buffers and an on_layer copy); gRPC delivers through
on_layer's copy. Each method's sender is a spawned process that holds the same layers and sends them
back to back when told to; the socket baseline moves the same bytes with sendall / recv_into the
destination. Seconds = receiver time from the first bytes to the last layer.

Paired rounds: each of --repeats rounds runs one transfer of every method, the socket first, one
after the other, so a method and its baseline see the same moment of a shared machine (this host's
loopback speed drifts by 2x over minutes). Reported per method: GB/s of its best round, and the
ratio to the socket in the same round (median, with min and max over the rounds). Both backends run
as the cluster runs them, with a cluster token (a fresh random one): gRPC sends it with every
transfer, the torch pair proves it in its handshake. The time each sender took to connect (torch: the
TCPStore rendezvous, two gloo groups and their two handshakes) is reported once per backend.
Torch runs with --torch-threads intra-op threads (default 1): on a 2-core machine OpenMP workers that
spin after the on_layer copy steal the cores the transfer needs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import secrets
import shlex
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from k2serve.rpc.auth import InternalAuth
from k2serve.transfer import BACKENDS, make_receiver, make_sender
from k2serve.transfer.base import DTYPES

_CHILD_START_S = 120.0  # a sender process has this long to build its layers and connect


def _layers(args: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(args.layers, args.tokens, args.kv_dim, generator=g).to(DTYPES[args.dtype])


def _socket_sender(port: int, args: argparse.Namespace) -> None:
    """Child: connect, then send every layer once per go byte from the receiver (b"q" ends it)."""
    torch.set_num_threads(args.torch_threads)
    kv = _layers(args)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        while sock.recv(1) == b"g":
            for layer in range(args.layers):
                sock.sendall(kv[layer].view(torch.uint8).numpy().data)


def _credentials(backend: str, token: str) -> dict[str, Any]:
    """The cluster token as each backend carries it (gRPC: call metadata; torch: the handshake)."""
    if backend == "grpc":
        return {"metadata": InternalAuth(token).metadata()}
    return {"token": token}


def _backend_sender(backend: str, endpoint: str, args: argparse.Namespace, go: Any, done: Any) -> None:
    """Child: one transfer per transfer id put on `go` (None ends it)."""
    torch.set_num_threads(args.torch_threads)
    kv = _layers(args)
    t0 = time.perf_counter()
    sender = make_sender(backend, endpoint, **_credentials(backend, args.token))
    done.put(time.perf_counter() - t0)  # connected (and, torch, authenticated)
    try:
        while (tid := go.get()) is not None:
            sender.open(tid, args.layers, args.tokens, args.kv_dim, kv.dtype)
            for layer in range(args.layers):
                sender.send_layer(tid, layer, kv[layer])
            done.put(sender.close(tid, timeout=120).seconds)
    finally:
        sender.shutdown()


class _SocketLink:
    """The baseline: a sender process on one loopback TCP connection."""

    def __init__(self, args: argparse.Namespace, dest: torch.Tensor) -> None:
        self.args, self.dest = args, dest
        self.server = socket.create_server(("127.0.0.1", 0))
        self.child = mp.get_context("spawn").Process(
            target=_socket_sender, args=(self.server.getsockname()[1], args), daemon=True
        )
        self.child.start()
        self.server.settimeout(_CHILD_START_S)
        self.conn, _ = self.server.accept()

    def transfer(self) -> float:
        self.conn.sendall(b"g")
        start = None
        for layer in range(self.args.layers):
            view = self.dest[layer].view(torch.uint8).numpy().data.cast("B")
            got = 0
            while got < len(view):
                n = self.conn.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError("socket sender closed early")
                start = start or time.perf_counter()
                got += n
        return time.perf_counter() - start  # type: ignore[operator]

    def close(self) -> None:
        try:
            self.conn.sendall(b"q")
        finally:
            self.conn.close()
            self.server.close()
            self.child.join(10)
            if self.child.is_alive():
                self.child.kill()


class _BackendLink:
    """One transfer backend: a receiver here, its sender process connected to it."""

    def __init__(self, backend: str, in_place: bool, args: argparse.Namespace, dest: torch.Tensor) -> None:
        self.args, self.dest, self.in_place = args, dest, in_place
        if backend == "grpc":
            interceptors = InternalAuth(args.token).thread_server_interceptors()
            self.receiver = make_receiver(backend, interceptors=interceptors)
        else:
            self.receiver = make_receiver(backend, token=args.token)
        ctx = mp.get_context("spawn")
        self.go, self.done = ctx.Queue(), ctx.Queue()
        self.child = ctx.Process(
            target=_backend_sender,
            args=(backend, self.receiver.endpoint, args, self.go, self.done),
            daemon=True,
        )
        self.child.start()
        self.connect_s = float(self.done.get(timeout=_CHILD_START_S))
        self.rounds = 0

    def transfer(self) -> float:
        a, dest = self.args, self.dest
        tid = f"bench-{self.rounds}"
        self.rounds += 1

        def land(layer: int, kv: torch.Tensor) -> None:
            dest[layer].copy_(kv)

        self.receiver.expect(
            tid,
            a.layers,
            a.tokens,
            a.kv_dim,
            dest.dtype,
            land,
            place=(lambda i: dest[i]) if self.in_place else None,
        )
        self.go.put(tid)
        seconds = self.receiver.wait(tid, timeout=120).seconds
        self.done.get(timeout=120)  # the sender's close: the next round starts from a quiet sender
        return seconds

    def close(self) -> None:
        self.go.put(None)
        self.child.join(30)
        if self.child.is_alive():
            self.child.kill()
        self.receiver.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument(
        "--tokens", default="4096", help="tokens per transfer; comma-separated for one table per size"
    )
    parser.add_argument("--kv-dim", type=int, default=576)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated subset of " + str(BACKENDS)
    )
    parser.add_argument("--repeats", type=int, default=5, help="paired rounds (every method once per round)")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch intra-op threads in both processes"
    )
    args = parser.parse_args(argv)
    try:
        sizes = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        parser.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    if any(t < 1 for t in sizes):
        parser.error(f"--tokens must be positive, got {args.tokens!r}")
    torch.set_num_threads(args.torch_threads)
    argv_used = list(argv) if argv is not None else sys.argv[1:]
    token = secrets.token_urlsafe(24)  # this run's cluster token
    for tokens in sizes:
        _bench_size(argparse.Namespace(**{**vars(args), "tokens": tokens, "token": token}))
    print("reproduce: k2serve bench transfer " + shlex.join(argv_used))
    return 0


def _bench_size(args: argparse.Namespace) -> None:
    """Paired rounds of every method at args.tokens tokens; prints the table."""
    layer_bytes = args.tokens * args.kv_dim * DTYPES[args.dtype].itemsize
    total = args.layers * layer_bytes
    print(f"moving {args.layers} layers x {args.tokens} tokens x {args.kv_dim} {args.dtype}")
    print(f"  = {layer_bytes:,} bytes per layer, {total:,} bytes ({total / 1e9:.3f} GB) per transfer")
    expected = _layers(args)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[expected.element_size()]
    dest = torch.zeros_like(expected)

    # (label, backend, in place): the torch backend receives into the destination itself (as into
    # a decode worker's pool) and, for comparison, through its staging buffers and on_layer's copy.
    backends = args.backends.split(",")
    methods = [(f"{b} (in place)" if b == "torch" else b, b, b == "torch") for b in backends]
    if "torch" in backends:
        methods.append(("torch (staged)", "torch", False))
    socket_link = _SocketLink(args, dest)
    links = {label: _BackendLink(backend, in_place, args, dest) for label, backend, in_place in methods}
    base: list[float] = []
    seconds: dict[str, list[float]] = {label: [] for label in links}
    try:
        for _ in range(args.repeats):
            base.append(socket_link.transfer())
            for label, link in links.items():
                dest.zero_()
                seconds[label].append(link.transfer())
                if not torch.equal(dest.view(bits), expected.view(bits)):
                    raise AssertionError(f"{label}: received tensors differ from the sent ones")
    finally:
        socket_link.close()
        for link in links.values():
            link.close()
    print(f"{args.repeats} paired rounds; GB/s of the best round, ratio to the socket in the same round")
    print(f"{'raw TCP socket':>17}: {total / min(base) / 1e9:6.2f} GB/s  (baseline)")
    for label, secs in seconds.items():
        ratios = [b / s for b, s in zip(base, secs, strict=True)]
        print(
            f"{label:>17}: {total / min(secs) / 1e9:6.2f} GB/s  ratio to socket median {statistics.median(ratios):.2f}"
            f" (min {min(ratios):.2f}, max {max(ratios):.2f}; target >= 0.70)"
        )
    connects = ", ".join(f"{label} {link.connect_s * 1e3:.0f} ms" for label, link in links.items())
    print(f"sender connect (torch: rendezvous + authenticated handshakes): {connects}")


if __name__ == "__main__":
    sys.exit(main())
