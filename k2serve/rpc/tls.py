"""TLS and mutual TLS for every gRPC hop, from PEM files: the one place that builds credentials.

A process is either plaintext (`TLSFiles` is None) or TLS (`--tls-cert` + `--tls-key`): its servers
listen with TLS only and its channels connect with TLS only. `--tls-ca` is the CA that signs the peers:
servers then require a client certificate signed by it (mutual TLS) and clients verify servers with it
(without it, clients verify against the system roots). A client presents its own certificate whenever
it has one, so the same files serve both directions. `--tls-server-name` overrides the name a client
checks in the server certificate (default: the host of the address it dials, DNS or IP SAN).

Hops: clients -> router (public gRPC), workers -> router (registration, on the router's internal
listener), router -> workers, prefill -> decode (KV over the gRPC transfer backend). Who may call
(API keys, the cluster token) is k2serve.rpc.auth's. The HTTP API
gets server TLS from the same certificate (clients authenticate there with the API key).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from k2serve.proto.limits import RECONNECT_OPTIONS
from k2serve.rpc.auth import InternalAuth

TARGET_NAME_OPTION = "grpc.ssl_target_name_override"


class TLSConfigError(ValueError):
    """The TLS flags are inconsistent or a PEM file is missing/unusable; carries the offending value."""

    def __init__(self, message: str, value: object = None) -> None:
        super().__init__(message)
        self.value = value


def transfer_backend_for(requested: str, tls: bool) -> str:
    """The KV transfer backend a cluster (or worker) uses: "auto" is torch (in-place receives, the
    faster one), or grpc under TLS; raises TLSConfigError for torch with TLS (torch.distributed moves
    plaintext only)."""
    backend = ("grpc" if tls else "torch") if requested == "auto" else requested
    if tls and backend != "grpc":
        raise TLSConfigError(
            f"--transfer-backend {backend} sends KV in plaintext (torch.distributed has no TLS); "
            "with TLS use --transfer-backend grpc",
            backend,
        )
    return backend


@dataclass(frozen=True)
class TLSFiles:
    """This process's certificate and key, and optionally the CA of its peers (PEM file paths).

    Checked on construction: the files exist, the key matches the certificate and the CA parses
    (TLSConfigError otherwise). The files are read again each time credentials are built.
    """

    cert: str
    key: str
    ca: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if path is not None and not Path(path).is_file():
                raise TLSConfigError(f"{flag} {path!r}: no such file", path)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as e:
            raise TLSConfigError(
                f"--tls-cert {self.cert!r} / --tls-key {self.key!r}: not a matching PEM pair ({e})",
                (self.cert, self.key),
            ) from e
        if self.ca is not None:
            try:
                ctx.load_verify_locations(cafile=self.ca)
            except ssl.SSLError as e:
                raise TLSConfigError(f"--tls-ca {self.ca!r}: not a PEM certificate ({e})", self.ca) from e
        if self.server_name is not None and not self.server_name:
            raise TLSConfigError("--tls-server-name must not be empty", self.server_name)

    @property
    def mutual(self) -> bool:
        """Servers require client certificates signed by `ca`."""
        return self.ca is not None

    def argv(self) -> list[str]:
        """The flags that give another k2serve process these files (launchers)."""
        out = ["--tls-cert", self.cert, "--tls-key", self.key]
        if self.ca is not None:
            out += ["--tls-ca", self.ca]
        if self.server_name is not None:
            out += ["--tls-server-name", self.server_name]
        return out

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS with this certificate; with `ca`, clients must present a certificate it signed."""
        ca = Path(self.ca).read_bytes() if self.ca is not None else None
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Verify the server with `ca` (system roots without it); present this certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca).read_bytes() if self.ca is not None else None,
            private_key=Path(self.key).read_bytes(),
            certificate_chain=Path(self.cert).read_bytes(),
        )

    def channel_options(self) -> list[tuple[str, str]]:
        """gRPC channel options: the server-name override, if any."""
        return [(TARGET_NAME_OPTION, self.server_name)] if self.server_name is not None else []


def add_port(server: grpc.Server | grpc.aio.Server, address: str, tls: TLSFiles | None) -> int:
    """Bind `address` ("host:0" picks a free port) with TLS or plaintext; the bound port.

    Raises OSError when gRPC could not bind (it reports that as port 0).
    """
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, tls.server_credentials())
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address!r}")
    return port


def aio_channel(
    target: str, options: list[tuple[str, int]], tls: TLSFiles | None, auth: InternalAuth | None = None
) -> grpc.aio.Channel:
    """An asyncio channel to `target`: secure with this process's files, else plaintext; with `auth`,
    every call carries the cluster token (an internal channel). It reconnects within 2 s of its peer
    coming back (RECONNECT_OPTIONS)."""
    interceptors = auth.client_interceptors() if auth is not None else []
    options = [*options, *RECONNECT_OPTIONS]
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(
        target,
        tls.channel_credentials(),
        options=[*options, *tls.channel_options()],
        interceptors=interceptors,
    )
