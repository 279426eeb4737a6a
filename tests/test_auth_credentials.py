"""The cluster credential itself (k2serve.rpc.auth): token files, the refusal to run internal services
without a credential, and the token check on the thread-pool gRPC server of the KV receiver."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from k2serve.cli import build_parser
from k2serve.cli.settings import router_settings, worker_settings
from k2serve.rpc.auth import AuthConfigError, InternalAuth, read_token_file, write_token_file
from k2serve.transfer.base import TransferError
from k2serve.transfer.grpc_backend import GrpcKVReceiver, GrpcKVSender

TOKEN = "k" * 40


def test_token_files_are_private_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "token"
    write_token_file(path, TOKEN + "\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token_file(str(path)) == TOKEN
    os.chmod(path, 0o644)
    with pytest.raises(AuthConfigError, match="readable by others"):
        read_token_file(str(path))
    os.chmod(path, 0o440)  # a Kubernetes Secret mounted with an fsGroup
    assert read_token_file(str(path)) == TOKEN
    write_token_file(tmp_path / "short", "abc")
    with pytest.raises(AuthConfigError, match=">= 16 characters"):
        read_token_file(str(tmp_path / "short"))
    with pytest.raises(AuthConfigError, match="no such file"):
        read_token_file(str(tmp_path / "absent"))


def test_no_credential_no_internal_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A router or worker needs a token, mutual TLS, or the explicit --insecure-internal."""
    monkeypatch.delenv("K2SERVE_CLUSTER_TOKEN_FILE", raising=False)
    with pytest.raises(AuthConfigError, match="--cluster-token-file"):
        InternalAuth()
    assert InternalAuth(mtls=True).metadata() == ()  # mutual TLS alone authenticates the peers
    parser = build_parser()
    for argv, settings in (
        (["router", "--model", "/m"], router_settings),
        (["decode", "--model", "/m"], lambda a: worker_settings("decode", a)),
    ):
        with pytest.raises(AuthConfigError, match="--insecure-internal"):
            settings(parser.parse_args(argv))
        assert settings(parser.parse_args([*argv, "--insecure-internal"])).internal.insecure
        token = tmp_path / "token"
        write_token_file(token, TOKEN)
        monkeypatch.setenv("K2SERVE_CLUSTER_TOKEN_FILE", str(token))
        got = settings(parser.parse_args(argv)).internal
        assert (got.token, got.insecure) == (TOKEN, False)
        monkeypatch.delenv("K2SERVE_CLUSTER_TOKEN_FILE")


def test_kv_receiver_takes_transfers_only_with_the_token() -> None:
    """The decode side's gRPC KV receiver (a thread-pool server) refuses pushes without the token."""
    auth = InternalAuth(token=TOKEN)
    receiver = GrpcKVReceiver("127.0.0.1:0", interceptors=auth.thread_server_interceptors())
    kv = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    try:
        for name, metadata, ok in (
            ("none", (), False),
            ("user-key", (("authorization", "Bearer " + TOKEN),), False),
            ("wrong", (("k2serve-cluster-token", "x" * 40),), False),
            ("token", auth.metadata(), True),
        ):
            got: dict[int, torch.Tensor] = {}
            receiver.expect(
                name, 2, 4, 3, torch.float32, lambda layer, t, got=got: got.__setitem__(layer, t.clone())
            )
            sender = GrpcKVSender(receiver.endpoint, metadata=metadata)
            try:
                sender.open(name, 2, 4, 3, torch.float32)
                for layer in range(2):
                    sender.send_layer(name, layer, kv[layer])
                if ok:
                    sender.close(name, timeout=30)
                    receiver.wait(name, timeout=30)
                    assert torch.equal(torch.stack([got[0], got[1]]), kv)
                else:
                    with pytest.raises(TransferError, match="UNAUTHENTICATED"):
                        sender.close(name, timeout=30)
                    assert receiver.cancel(name) and not got
            finally:
                sender.shutdown()
    finally:
        receiver.shutdown()
