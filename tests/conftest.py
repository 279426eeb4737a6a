"""Shared fixtures: small random checkpoints written once per session, a test PKI (TLS), the repo's
sibling ../shared."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from k2serve.cluster.tls import TLSFiles

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent (a user's clone)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent: ../shared (reference files) exists only in the k2serve workspace")
    return p


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` preset, fp32 weights, seed 0, with its tokenizer."""
    from k2serve.model.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_int4_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from k2serve.model.checkpoint import write_checkpoint

    return write_checkpoint(
        tmp_path_factory.mktemp("tiny_int4"), "tiny", seed=0, quant="int4", dtype=torch.float32
    )


@dataclass(frozen=True)
class PKI:
    ca: Path
    cert: Path  # leaf signed by ca, SAN 127.0.0.1 + localhost, server and client use
    key: Path
    other_cert: Path  # a leaf with the same SANs signed by another CA
    other_key: Path

    @property
    def files(self) -> TLSFiles:
        return TLSFiles(str(self.cert), str(self.key), str(self.ca))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("k2serve"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _write(d: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> Path:
    (d / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        (d / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return d / f"{name}.crt"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A CA, a leaf it signed for localhost and 127.0.0.1 (server and client use), and a leaf with the
    same SANs signed by another CA."""
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = _ca("k2serve test CA")
    other_ca, other_ca_key = _ca("another CA")
    _write(d, "ca", ca, None)
    _write(d, "node", *_leaf(ca, ca_key))
    _write(d, "other", *_leaf(other_ca, other_ca_key))
    return PKI(d / "ca.crt", d / "node.crt", d / "node.key", d / "other.crt", d / "other.key")
