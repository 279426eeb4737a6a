"""Shared fixtures: small random checkpoints written once per session (and an INT4 one's dequantised
twin), which path INT4 experts took, a test PKI (TLS), the repo's sibling ../shared, the spec of a
test cluster, the tiny preset behind the OpenAI HTTP app (and an `openai` client of it) or in a real
`k2serve serve` process, a scripted
GenerationBackend, and a gRPC server on a background event loop."""

from __future__ import annotations

import os

# The Triton kernels run here (no GPU) under triton's interpreter, as a process started with
# TRITON_INTERPRET=1 runs them. Set before anything imports triton: torch's own ops import it lazily, and
# triton.language's @jit helpers (tl.max, tl.sum) decorated before the variable is set cannot be called
# from an interpreted kernel later in the same process. Tests that need it unset delete it themselves.
os.environ.setdefault("TRITON_INTERPRET", "1")

import asyncio
import datetime
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from k2serve.api.openai_app import build_app
from k2serve.chat.bpe_train import write_tokenizer
from k2serve.chat.tokenizer import KimiTokenizer, load_tokenizer
from k2serve.cluster.local import ClusterSpec
from k2serve.engine.async_engine import AsyncEngine
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm_engine import LLMEngine
from k2serve.engine.protocol import BackendFailure, BackendStats, GenerateRequest, TokenEvent
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.validation import validate_request
from k2serve.rpc.tls import TLSFiles
from k2serve.testing.app_server import serve_in_thread

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


SMALL_KV = ("--kv-cache-mb", "32", "--block-size", "8")  # the engine flags of a test cluster's workers


def local_cluster_spec(
    model_dir: str | Path, workdir: str | Path | None = None, **overrides: Any
) -> ClusterSpec:
    """The one way tests describe a LocalCluster (or RayCluster): `model_dir` on free ports (HTTP and
    gRPC 0), one prefill and one decode worker with a 32 MiB KV pool of 8-token blocks (SMALL_KV), no
    Redis, logs under `workdir`; every other field ClusterSpec's default. `overrides` set any field."""
    fields: dict[str, Any] = {
        "model_dir": str(model_dir),
        "port": 0,
        "grpc_port": 0,
        "use_redis": False,
        "engine_args": SMALL_KV,
        "workdir": None if workdir is None else str(workdir),
    }
    return ClusterSpec(**(fields | overrides))


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


@pytest.fixture(scope="session")
def tiny_int4_all_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny` with every linear layer but the router INT4 (lm_head too; bf16 elsewhere)."""
    from k2serve.model.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny_int4_all"), "tiny", seed=0, quant="int4-all")


def dequantized_copy(src: Path, dst: Path) -> Path:
    """The checkpoint `src` written to `dst` with every INT4 or FP8 weight replaced by its dense
    dequantised form (fp32), and no quantization_config."""
    from safetensors.torch import load_file, save_file

    from k2serve.model.quant import dequantize_fp8_block, dequantize_int4

    dst.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    new_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(src / shard))
        out = {}
        for name, t in tensors.items():
            if name.endswith(".weight_packed"):
                base = name[: -len("_packed")]
                out[base] = dequantize_int4(t, tensors[base + "_scale"], torch.float32)
            elif t.dtype == torch.float8_e4m3fn:
                out[name] = dequantize_fp8_block(t, tensors[name + "_scale_inv"])
            elif not name.endswith((".weight_scale", ".weight_shape", ".weight_scale_inv")):
                out[name] = t
        save_file(out, str(dst / shard))
        new_map.update(dict.fromkeys(out, shard))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": new_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="session")
def tiny_int4_dequantized_ckpt(tiny_int4_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_int4_ckpt` with its experts dequantised to fp32: the reference for INT4 execution."""
    return dequantized_copy(tiny_int4_ckpt, tmp_path_factory.mktemp("tiny_int4_dense") / "ckpt")


@pytest.fixture
def int4_expert_rows(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[int]]]:
    """Records the row count of every INT4 expert call by path: {"fused": [...], "dense": [...]}
    (the fused CPU INT4 kernel, or dequantise-then-dense-GEMM); dense experts are not recorded."""
    from k2serve.model.moe import RoutedExperts

    rows: dict[str, list[int]] = {"fused": [], "dense": []}
    fused, dense = RoutedExperts.swiglu_int4_fused, RoutedExperts.swiglu_dense

    def spy_fused(self: RoutedExperts, e: int, x: torch.Tensor) -> torch.Tensor:
        rows["fused"].append(x.shape[0])
        return fused(self, e, x)

    def spy_dense(self: RoutedExperts, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.int4_group_size is not None:
            rows["dense"].append(x.shape[0])
        return dense(self, e, x)

    monkeypatch.setattr(RoutedExperts, "swiglu_int4_fused", spy_fused)
    monkeypatch.setattr(RoutedExperts, "swiglu_dense", spy_dense)
    yield rows


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


API_ENGINE = EngineConfig(num_kv_blocks=512, block_size=8, max_model_len=512)  # the HTTP tests' engine


@contextmanager
def tiny_api_server(
    ckpt: Path, api_key: str | None = None, config: EngineConfig = API_ENGINE
) -> Iterator[tuple[str, AsyncEngine]]:
    """The checkpoint `ckpt` in a started AsyncEngine (model name "tiny", fp32) behind the OpenAI HTTP
    app on a background thread: yields (base URL, engine); both stopped on exit. Torch runs one thread
    meanwhile: the engine thread shares the 2 cores with uvicorn and the client."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = AsyncEngine.from_pretrained(ckpt, torch.float32, config, model_name="tiny")
    engine.start()
    try:
        with serve_in_thread(build_app(engine, api_key=api_key)) as url:
            yield url, engine
    finally:
        engine.shutdown()
        torch.set_num_threads(threads)


def run_all(engine: LLMEngine) -> dict[str, list[int]]:
    """Step `engine` until it is idle; the tokens of every request that finished, by request id."""
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        out |= {o.request_id: o.token_ids for o in engine.step() if o.finished}
    return out


def greedy_all(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The greedy tokens (EOS ignored) of `prompts`, all added at once and run to the end, in order."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    got = run_all(engine)
    return [got[str(i)] for i in range(len(prompts))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_popen(
    tmp: Path, api_key: str | None = None, max_model_len: int = 512
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real `k2serve serve --preset tiny` process (served model "tiny", keys `api_key` from the
    environment, logs in tmp/serve.log); yields its URL and the process once /health answers, killed
    on exit unless it already ended."""
    port = free_port()
    env = {**os.environ, "K2SERVE_HOME": str(tmp), "OMP_NUM_THREADS": "1"}
    env.pop("K2SERVE_API_KEY", None)
    if api_key is not None:
        env["K2SERVE_API_KEY"] = api_key
    cmd = [sys.executable, "-m", "k2serve.cli", "serve", "--preset", "tiny", "--port", str(port)]
    cmd += ["--max-model-len", str(max_model_len), "--kv-cache-mb", "16", "--served-model-name", "tiny"]
    log = (tmp / "serve.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp / "serve.log").read_text()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()


@contextmanager
def serve_process(tmp: Path, api_key: str | None = None, max_model_len: int = 512) -> Iterator[str]:
    """`serve_popen`, yielding only the URL."""
    with serve_popen(tmp, api_key, max_model_len) as (url, _):
        yield url


@pytest.fixture(scope="module")
def tiny_api(tiny_ckpt: Path) -> Iterator[tuple[str, AsyncEngine]]:
    """tiny_api_server(tiny_ckpt) without an API key, one per test module."""
    with tiny_api_server(tiny_ckpt) as served:
        yield served


@pytest.fixture(scope="module")
def api_url(tiny_api: tuple[str, AsyncEngine]) -> str:
    return tiny_api[0]


@pytest.fixture(scope="module")
def api_engine(tiny_api: tuple[str, AsyncEngine]) -> AsyncEngine:
    return tiny_api[1]


@pytest.fixture(scope="module")
def api_client(api_url: str) -> openai.OpenAI:
    """An `openai` client of tiny_api (no retries, 60 s timeout)."""
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=60)


class ScriptedBackend:
    """Replays `script` two tokens per event (finish "stop" at its end, "length" if cut by max_tokens);
    raises BackendFailure at token `fail_at`; records requests and aborts."""

    def __init__(self, tok: KimiTokenizer, script: list[int]) -> None:
        self._tok = tok
        self.script = script
        self.fail_at: int | None = None
        self.delay_s = 0.0
        self.requests: list[GenerateRequest] = []
        self.aborted: list[str] = []

    model_name = "scripted"
    max_model_len = 4096

    @property
    def tokenizer(self) -> KimiTokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size

    def check_admission(self) -> None:
        return None

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        validate_request(
            request.prompt_token_ids,
            request.params,
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
        )
        self.requests.append(request)
        return self._events(request)

    async def _events(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        ids = self.script[: request.params.max_tokens]
        reason = "stop" if len(ids) == len(self.script) else "length"
        for i in range(0, len(ids), 2):
            if self.fail_at is not None and i >= self.fail_at:
                raise BackendFailure("scripted failure", request.request_id)
            await asyncio.sleep(self.delay_s)
            last = i + 2 >= len(ids)
            yield TokenEvent(ids[i : i + 2], reason if last else None, len(request.prompt_token_ids), 0)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> BackendStats:
        return BackendStats(0, 0, 0, 1, 0.0, 0)


def scripted_backend(tmp_path_factory: pytest.TempPathFactory, output: str) -> ScriptedBackend:
    """A ScriptedBackend replaying `output` over a fresh 1,024-rank tokenizer (the API tests' backend)."""
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out, 1024)
    tok = load_tokenizer(out)
    return ScriptedBackend(tok, tok.encode(output))


@dataclass
class GrpcServer:
    """A grpc.aio server running on its own event loop thread (see `grpc_server_in_thread`)."""

    target: str  # host:port
    loop: asyncio.AbstractEventLoop

    def run(self, coro: object, timeout: float = 10) -> object:
        """Run a coroutine on the server's loop (e.g. a call into an in-memory store the servicer uses)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]


@contextmanager
def grpc_server_in_thread(add_servicers: Callable[[grpc.aio.Server], None]) -> Iterator[GrpcServer]:
    """A grpc.aio server on 127.0.0.1 (a free port) with the servicers `add_servicers` adds, served by an
    event loop on a background thread; stopped and joined on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-aio", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        add_servicers(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield GrpcServer(f"127.0.0.1:{port}", loop)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
