"""The Ray actor behind every k2serve process on a Ray cluster: it runs one `python -m k2serve ...` child
on its node and ties the two lives together.

Why a child process rather than the asyncio entry inside the actor: the router and the workers own
their process (signal handlers on the main thread's event loop, torch's process-wide default dtype
and threads, CUDA_VISIBLE_DEVICES as Ray set it for the actor), and the CLI is the one entry that is
tested; the actor only supervises it, so the code that serves is the same under both launchers.

Lives tied together:

- the child dies with the actor: it is started from the actor's main thread (Ray runs a synchronous
  actor's constructor there) with PR_SET_PDEATHSIG = SIGTERM on Linux, so `ray.kill` or a crashed actor
  stops it (gracefully: the worker deregisters) instead of leaving an orphan registered twice;
- the actor dies with the child: once the child was ready (or in a restarted actor), its unexpected
  exit ends the actor process (exit status 1), and Ray restarts the actor up to `max_restarts` times;
  the constructor runs again, starts a fresh child, and the worker registers with the router again.
  A first child that dies before it was ready is left to `wait_ready`, which reports its log tail.

`ProcessActor` is a plain class: `ray_runtime` wraps it with `ray.remote` (max_concurrency 1).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from k2serve.rpc.auth import write_token_file

NODE_IP = "{node_ip}"  # in ChildSpec.argv: the IP Ray knows for the actor's node
REDIS_URL = "{redis_url}"  # in ChildSpec.argv: the embedded Redis the actor started (embedded_redis)
REDIS_PASSWORD_FILE = "{redis_password_file}"  # noqa: S105 - a placeholder in ChildSpec.argv: that Redis's password file
_PR_SET_PDEATHSIG = 1


class ChildError(RuntimeError):
    """The child process exited or did not become ready; carries its name and the end of its log."""

    def __init__(self, name: str, problem: str, log_tail: str) -> None:
        super().__init__(f"{name} {problem}:\n{log_tail}")
        self.name = name
        self.problem = problem
        self.log_tail = log_tail


@dataclass(frozen=True)
class ChildSpec:
    """One k2serve process: `python -m k2serve <argv> --ready-file <workdir>/<name>.ready`.

    argv may hold NODE_IP, REDIS_URL and REDIS_PASSWORD_FILE, substituted in the actor. workdir: a directory path valid on
    every node (created there); the log is `<workdir>/logs/<name>.log`, appended across restarts.
    env: added to the actor's environment. embedded_redis: start an EmbeddedRedis (data in
    `<workdir>/redis-<name>`, AOF on, 127.0.0.1 only, a generated password) before the child,
    stopped after it. cluster_token: written to a
    0600 file `<workdir>/<name>.cluster-token` on the actor's node, passed as --cluster-token-file.
    """

    name: str
    argv: tuple[str, ...]
    workdir: str
    env: dict[str, str] = field(default_factory=dict)
    embedded_redis: bool = False
    cluster_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"child name must be a non-empty file name, got {self.name!r}")
        if not self.argv:
            raise ValueError(f"{self.name}: empty argv")


def node_ip() -> str:
    """The address Ray uses for this node (what other nodes reach it by)."""
    import ray

    return str(ray.util.get_node_ip_address())


def probe_ports(n: int) -> tuple[str, list[int]]:
    """This node's IP and `n` ports free on it right now (run as a task inside a placement bundle so
    that the addresses are known before the actors that bind them are created)."""
    ip = node_ip()
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((ip, 0))
        return ip, [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn: Linux SIGTERMs the child when the thread that started it dies; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only makes the call
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the actor died before the call: nobody would stop us
            os._exit(1)

    return preexec


class ProcessActor:
    """Starts the child in the constructor; see the module docstring for the shared-fate contract."""

    def __init__(self, spec: ChildSpec) -> None:
        import ray

        self.spec = spec
        self.dir = Path(spec.workdir)
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "logs" / f"{spec.name}.log"
        self.ready_file = self.dir / f"{spec.name}.ready"
        self.ready_file.unlink(missing_ok=True)
        with warnings.catch_warnings():  # Ray's property reads its own deprecated actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self.node_ip = node_ip()
        self.node_id = ray.get_runtime_context().get_node_id()
        self._stopping = False
        self._ready_seen = False
        self.redis = None
        subst = {NODE_IP: self.node_ip}
        if spec.embedded_redis:
            from k2serve.cluster.local import start_embedded_redis

            self.redis, connection = start_embedded_redis(self.dir / f"redis-{spec.name}")
            subst[REDIS_URL] = connection.url
            subst[REDIS_PASSWORD_FILE] = str(connection.password_file)
        argv = [subst.get(a, a) for a in spec.argv]
        if spec.cluster_token is not None:
            token_file = self.dir / f"{spec.name}.cluster-token"
            write_token_file(token_file, spec.cluster_token)
            argv += ["--cluster-token-file", str(token_file)]
        env = dict(os.environ) | spec.env | {"PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as f:
            f.write(f"==== {spec.name} on {self.node_ip} (restarted: {self.restarted})\n".encode())
            f.flush()
            self.popen = subprocess.Popen(  # noqa: S603 - our own CLI
                [sys.executable, "-m", "k2serve", *argv, "--ready-file", str(self.ready_file)],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent(),  # noqa: PLW1509 - a prctl call only, libc loaded before
            )
        threading.Thread(target=self._watch, name=f"watch-{spec.name}", daemon=True).start()

    def _watch(self) -> None:
        code = self.popen.wait()
        if self._stopping or not (self._ready_seen or self.restarted or self.ready_file.exists()):
            return  # asked to stop, or a first start that failed: wait_ready reports it
        print(f"{self.spec.name} exited with {code}; ending its actor so that Ray restarts it", flush=True)
        if self.redis is not None:
            self.redis.stop()
        os._exit(1)

    def tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def wait_ready(self, timeout_s: float) -> str:
        """The ready file's content (a worker's address, or the router's "HTTP_PORT GRPC_PORT").
        Raises ChildError when the child exits or is not ready within timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready_file.exists() and (text := self.ready_file.read_text().strip()):
                self._ready_seen = True
                return text
            if self.popen.poll() is not None:
                raise ChildError(self.spec.name, f"exited with {self.popen.returncode}", self.tail())
            time.sleep(0.05)
        raise ChildError(self.spec.name, f"was not ready within {timeout_s:.0f} s", self.tail())

    def info(self) -> dict[str, object]:
        """Where and what: name, node_ip, node_id, pid (of the child), log, restarted, returncode."""
        return {
            "name": self.spec.name,
            "node_ip": self.node_ip,
            "node_id": self.node_id,
            "pid": self.popen.pid,
            "log": str(self.log),
            "restarted": self.restarted,
            "returncode": self.popen.poll(),
        }

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM the child (it drains and deregisters), SIGKILL its process group after timeout_s;
        then stop the embedded Redis. Returns the child's exit status. The actor stays alive."""
        self._stopping = True
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        return int(self.popen.returncode)
