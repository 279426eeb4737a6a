"""EmbeddedRedis: a real redis-server that starts, persists (AOF), authenticates and never outlives us."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from k2serve.cluster.redis_server import (
    EmbeddedRedis,
    RedisServerConfig,
    RedisServerError,
    redis_url_from_env_or_embedded,
)

NO_RETRY = Retry(NoBackoff(), 0)  # redis-py's default retries back off for seconds on a refusal


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    stat_file = Path(f"/proc/{pid}/stat")
    if stat_file.parent.parent.exists():  # Linux: a reaped pid has no entry, a zombie has state Z
        try:
            return stat_file.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_start_stop_leaves_no_process_or_files() -> None:
    server = EmbeddedRedis().start()
    pid, data_dir = server.pid, server.data_dir
    assert server.running and pid_alive(pid)
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert server.client().ping()
    server.stop()
    assert not server.running
    assert not pid_alive(pid)
    assert not data_dir.exists()
    server.stop()  # idempotent


def test_context_manager_stops_on_error() -> None:
    with pytest.raises(RuntimeError, match="boom"), EmbeddedRedis() as server:
        pid = server.pid
        raise RuntimeError("boom")
    assert not pid_alive(pid)


def test_restart_replays_aof_on_same_url() -> None:
    with EmbeddedRedis() as server:
        url, old_pid = server.url, server.pid
        server.client().rpush("k", "a", "b")
        server.restart()
        assert server.url == url and server.pid != old_pid
        assert not pid_alive(old_pid)
        assert server.client().lrange("k", 0, -1) == [b"a", b"b"]
        assert (server.data_dir / "appendonly.aof").stat().st_size > 0


def test_crash_with_appendfsync_always_keeps_acknowledged_writes() -> None:
    with EmbeddedRedis(RedisServerConfig(appendfsync="always")) as server:
        server.client().set("k", "v")
        server.kill()  # SIGKILL: no clean shutdown
        server.restart()
        assert server.client().get("k") == b"v"


def test_appendonly_off_keeps_nothing_across_restart() -> None:
    with EmbeddedRedis(RedisServerConfig(appendonly=False)) as server:
        server.client().set("k", "v")
        server.restart()
        assert server.client().get("k") is None


def test_password_required_and_kept_off_the_command_line() -> None:
    config = RedisServerConfig(password="s3cr/t:pw")
    with EmbeddedRedis(config) as server:
        assert server.url == f"redis://:s3cr%2Ft%3Apw@127.0.0.1:{server.port}/0"
        assert server.client().ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, password="wrong", retry=NO_RETRY).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, retry=NO_RETRY).ping()
        if Path(f"/proc/{server.pid}/cmdline").exists():
            assert b"s3cr" not in Path(f"/proc/{server.pid}/cmdline").read_bytes()
        conf = server.data_dir / "redis.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600


def test_kept_data_dir_survives_stop(tmp_path: Path) -> None:
    config = RedisServerConfig(data_dir=tmp_path)
    with EmbeddedRedis(config) as server:
        server.client().set("k", "v")
    with EmbeddedRedis(config) as server:
        assert server.client().get("k") == b"v"


@pytest.mark.parametrize(
    "kwargs",
    [{"appendfsync": "sometimes"}, {"password": ""}, {"password": "a b"}, {"port": 0}, {"stop_timeout_s": 0}],
)
def test_bad_config_is_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(RedisServerError):
        RedisServerConfig(**kwargs)  # type: ignore[arg-type]


def test_failed_start_reports_the_log(tmp_path: Path) -> None:
    with EmbeddedRedis() as holder:  # its port is taken: the second server cannot bind it
        server = EmbeddedRedis(RedisServerConfig(port=holder.port, data_dir=tmp_path))
        with pytest.raises(RedisServerError, match="exited at startup"):
            server.start()
        assert not server.running


def test_url_from_env_or_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/2")
    with redis_url_from_env_or_embedded() as url:
        assert url == "redis://example:6379/2"
    monkeypatch.delenv("REDIS_URL")
    with redis_url_from_env_or_embedded() as url:
        client = redis.Redis.from_url(url)
        assert client.ping()
        pid = int(client.info("server")["process_id"])
        client.close()
    assert not pid_alive(pid)


# The supervisor makes itself a child subreaper, so the orphaned redis-server is reparented to it
# (not to a PID 1 that may never reap) and it can wait for the server's exit.
_PARENT = """
import time
from k2serve.cluster.redis_server import EmbeddedRedis
print(EmbeddedRedis().start().pid, flush=True)
time.sleep(60)
"""
_SUPERVISOR = f"""
import ctypes, os, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
parent = subprocess.Popen([sys.executable, "-c", {_PARENT!r}], stdout=subprocess.PIPE, text=True)
pid = int(parent.stdout.readline())
parent.kill()  # SIGKILL: neither atexit nor stop() runs
parent.wait()
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    if os.waitpid(pid, os.WNOHANG)[0]:
        print("reaped")
        sys.exit(0)
    time.sleep(0.02)
os.kill(pid, 9)
os.waitpid(pid, 0)
print("outlived its parent")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_dies_with_a_killed_parent() -> None:
    out = subprocess.run([sys.executable, "-c", _SUPERVISOR], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "reaped", out.stdout + out.stderr
