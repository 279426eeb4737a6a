"""A local `mooncake_master` process (Mooncake Store's master with its built-in HTTP metadata server), for
`k2serve up --kv-store mooncake`, tests and benchmarks.

`MooncakeMaster` owns the process entirely, like the embedded Redis (cluster/redis_server.py): free
loopback ports (RPC, HTTP metadata, metrics), its own session, Linux's parent-death signal (started from
the main thread, it dies with its launcher however that dies), `stop()` registered with atexit while it
runs (SIGTERM, then SIGKILL after `stop_timeout_s`). Its log goes to a file in a temporary directory that
`stop()` deletes; a failed start raises with the log's tail. Mooncake Store has no authentication: the
master binds its RPC and metrics servers to 127.0.0.1 (its HTTP metadata server, in the 0.3.13 wheel,
binds every interface although it is asked for 127.0.0.1: keep such a host's ports firewalled, and a
cluster's store on a private network).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from k2serve.cluster.lifeline import die_with_parent

__all__ = ["MooncakeMaster", "MooncakeMasterError", "find_mooncake_master"]

EXECUTABLE = "mooncake_master"


class MooncakeMasterError(RuntimeError):
    """mooncake_master could not be found, started or stopped."""


def find_mooncake_master() -> str | None:
    """The mooncake_master executable on PATH (the `mooncake` extra installs it), or None."""
    return shutil.which(EXECUTABLE)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


class MooncakeMaster:
    """One mooncake_master child on 127.0.0.1 (see the module docstring). `port` / `metadata_port`:
    None picks free ones (kept across `stop()` + `start()`, so a restarted master is found again)."""

    def __init__(
        self,
        port: int | None = None,
        metadata_port: int | None = None,
        startup_timeout_s: float = 30.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        executable = find_mooncake_master()
        if executable is None:
            raise MooncakeMasterError(
                f"{EXECUTABLE} is not on PATH; install it with: pip install 'k2serve[mooncake]' "
                "(and Debian's libibverbs1 librdmacm1 libnuma1)"
            )
        self.executable = executable
        self.port = port or _free_port()
        self.metadata_port = metadata_port or _free_port()
        self.metrics_port = _free_port()
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """The RPC address clients give as the master: 127.0.0.1:PORT."""
        return f"127.0.0.1:{self.port}"

    @property
    def metadata_url(self) -> str:
        """The HTTP metadata server's URL for the clients' transfer engines."""
        return f"http://127.0.0.1:{self.metadata_port}/metadata"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise MooncakeMasterError(f"{EXECUTABLE} is not started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> MooncakeMaster:
        """Start the master and wait until its RPC and metadata ports accept; returns self."""
        if self.running:
            return self
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="k2serve-mooncake-"))
        cmd = [
            self.executable,
            "-enable_http_metadata_server=true",
            "-http_metadata_server_host=127.0.0.1",
            f"-http_metadata_server_port={self.metadata_port}",
            "-rpc_address=127.0.0.1",
            f"-rpc_port={self.port}",
            "-metrics_host=127.0.0.1",
            f"-metrics_port={self.metrics_port}",
        ]
        with open(self._dir / "master.log", "ab") as log:
            self._proc = subprocess.Popen(  # noqa: S603 - the mooncake_master found on PATH
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),  # noqa: PLW1509 - a prctl call only, libc loaded before
            )
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout_s
        while not (_accepts(self.port) and _accepts(self.metadata_port)):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise MooncakeMasterError(f"{EXECUTABLE} did not start on port {self.port}; log:\n{tail}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL the master (crash tests); `start()` starts a new one on the same ports."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        """Stop the master (SIGTERM, then SIGKILL) and delete its directory. Safe to call any number of
        times."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        atexit.unregister(self.stop)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def log_tail(self, lines: int = 20) -> str:
        log = self._dir / "master.log" if self._dir is not None else None
        if log is None or not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> MooncakeMaster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
