"""Where the session store's Redis is and how to reach it: URL, password, TLS files.

What users of redis-py expect works as-is: `redis://:PASSWORD@host:6379/0` (or `redis://USER:PASSWORD@`
with Redis ACLs) and `rediss://` for TLS, which verifies the server's certificate and host name
against the system roots, or against `ca` when given. `password_file` keeps the password out of the
URL, hence out of the process list and the environment (a trailing newline is ignored); give the
password one way, not both. `cert`/`key` is the client certificate for a server that requires one
(`tls-auth-clients yes`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis

__all__ = ["RedisConnection", "redacted_url"]

_SCHEMES = ("redis", "rediss", "unix")


def redacted_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


@dataclass(frozen=True)
class RedisConnection:
    """The session store's Redis (flags `--redis-url`, `--redis-password-file`, `--redis-ca`,
    `--redis-cert`, `--redis-key`). Checked on construction (ValueError naming the flag)."""

    url: str
    password_file: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in _SCHEMES:
            raise ValueError(
                f"--redis-url {redacted_url(self.url)!r}: expected redis://, rediss:// (TLS) or unix://"
            )
        tls = parts.scheme == "rediss"
        for flag, path in (("--redis-ca", self.ca), ("--redis-cert", self.cert), ("--redis-key", self.key)):
            if path is None:
                continue
            if not tls:
                raise ValueError(f"{flag} needs a rediss:// URL (TLS), got {redacted_url(self.url)!r}")
            if not Path(path).is_file():
                raise ValueError(f"{flag} {path!r}: no such file")
        if (self.cert is None) != (self.key is None):
            raise ValueError("--redis-cert and --redis-key go together")
        if self.password_file is not None:
            if parts.password:
                raise ValueError(
                    "the Redis password is given twice: in --redis-url and in --redis-password-file"
                )
            self.password()  # readable and non-empty, or ValueError now rather than at the first call

    @property
    def where(self) -> str:
        """The URL without its password."""
        return redacted_url(self.url)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "rediss"

    def password(self) -> str | None:
        """The password from `password_file` (read on each call, so a rotated file is picked up by
        new connections); None when there is no file (the URL's, if any, applies)."""
        if self.password_file is None:
            return None
        try:
            text = Path(self.password_file).read_text()
        except OSError as e:
            raise ValueError(f"--redis-password-file {self.password_file!r}: {e.strerror}") from e
        password = text.rstrip("\r\n")
        if not password:
            raise ValueError(f"--redis-password-file {self.password_file!r} is empty")
        return password

    def client(self, **options: Any) -> redis.Redis:
        """A redis-py client; `options` (timeouts, retry) go to `redis.Redis.from_url`."""
        if (password := self.password()) is not None:
            options["password"] = password
        if self.ca is not None:
            options["ssl_ca_certs"] = self.ca
        if self.cert is not None:
            options["ssl_certfile"] = self.cert
            options["ssl_keyfile"] = self.key
        return redis.Redis.from_url(self.url, **options)

    def password_moved_to(self, path: Path) -> RedisConnection:
        """This connection with the URL's password (if any) written to `path` (mode 0600) and
        given as `password_file` instead, so that `argv()` shows no secret; self when the URL has none."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(unquote(parts.password))
        user = f"{parts.username}@" if parts.username else ""
        netloc = user + parts.netloc.rpartition("@")[2]  # host:port as written (IPv6 brackets kept)
        url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        return replace(self, url=url, password_file=str(path))

    def argv(self) -> list[str]:
        """The flags that describe this connection to another k2serve process (no secret in them:
        the password travels only by file, or in a URL that the caller chose to pass)."""
        args = ["--redis-url", self.url]
        for flag, value in (
            ("--redis-password-file", self.password_file),
            ("--redis-ca", self.ca),
            ("--redis-cert", self.cert),
            ("--redis-key", self.key),
        ):
            if value is not None:
                args += [flag, value]
        return args
