"""`k2serve serve` as a process of its own, for benchmarks that compare it with the cluster.

Each side of a comparison runs in its own processes (the load generator in the benchmark's process), so
the colocated baseline does not share a GIL with the client that measures it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx


class ServeStartError(RuntimeError):
    """`k2serve serve` exited or did not answer /health in time; `log` is the tail of its output."""

    def __init__(self, why: str, log: str) -> None:
        super().__init__(f"k2serve serve {why}:\n{log}")
        self.log = log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_process(
    model: Path,
    dtype: str,
    engine_args: Sequence[str],
    threads: int,
    log_path: Path,
    start_timeout_s: float = 300.0,
) -> Iterator[str]:
    """Run `k2serve serve` on `model` with `threads` torch threads (OMP/MKL_NUM_THREADS); yields its base
    URL once /health answers 200. The process group is stopped on exit (SIGTERM, SIGKILL after 20 s)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "k2serve", "serve", "--model", str(model), "--dtype", dtype]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *engine_args]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(  # noqa: S603 - `python -m k2serve serve`: our own command line
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"

    def tail() -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])

    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise ServeStartError(f"exited with {proc.returncode}", tail())
            if time.monotonic() > deadline:
                raise ServeStartError(f"did not answer /health within {start_timeout_s:.0f} s", tail())
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
