"""The router's static worker list (`k2serve router --worker prefill=HOST:PORT --worker decode=HOST:PORT`):
workers started without `--router` never register, so the router serves only through the workers it was
told about; its greedy output must match the offline engine token for token. Malformed `--worker`
values are refused, naming the value."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from cluster_calls import grpc_greedy, http_greedy

from k2serve.cli import build_parser
from k2serve.cli.settings import router_settings
from k2serve.cluster.local import Proc
from k2serve.engine.config import EngineConfig
from k2serve.engine.llm import LLM
from k2serve.engine.sampling_params import SamplingParams
from k2serve.proto import api_pb2_grpc
from k2serve.rpc.auth import write_token_file

ENGINE_ARGS = ("--kv-cache-mb", "32", "--block-size", "8", "--max-num-batched-tokens", "256")
STARTUP_TIMEOUT_S = 120.0
PROMPTS = [[5, 17, 300, 2, 999, 41, 8], [1, 2, 3], list(range(100, 140))]
MAX_TOKENS = [6, 3, 5]


class Processes:
    """k2serve processes of one test module, each in its own session with its log under `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(self, name: str, args: list[str]) -> str:
        """Start `k2serve <args> --ready-file ...` and return what it writes there once serving."""
        ready = self.workdir / f"{name}.ready"
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as f:
            popen = subprocess.Popen(
                [sys.executable, "-m", "k2serve", *args, "--ready-file", str(ready)],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=dict(os.environ) | {"PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if ready.exists() and ready.read_text().strip():
                return ready.read_text().strip()
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited with {popen.returncode}:\n{proc.tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"{name} was not ready after {STARTUP_TIMEOUT_S:.0f} s:\n{proc.tail()}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM every process, newest first (the router before its workers); SIGKILL the stragglers."""
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()


@pytest.fixture(scope="module")
def static_router(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A prefill and a decode worker that register nowhere (no --router), and a router that knows them
    only from --worker. Yields the router's URLs and the workers' addresses."""
    workdir = tmp_path_factory.mktemp("static")
    procs = Processes(workdir)
    token = ["--cluster-token-file", str(workdir / "cluster-token")]
    write_token_file(token[1], secrets.token_urlsafe(32))  # hand-run processes share one credential
    try:
        workers = {}
        for role in ("prefill", "decode"):
            common = ["--model", str(tiny_ckpt), "--dtype", "float32", "--host", "127.0.0.1", "--port", "0"]
            common += token
            workers[role] = procs.start(role, [role, *common, *ENGINE_ARGS])
        ports = procs.start(
            "router",
            [
                "router",
                "--model",
                str(tiny_ckpt),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--grpc-port",
                "0",
                "--worker",
                f"prefill={workers['prefill']}",
                "--worker",
                f"decode={workers['decode']}",
                *token,
            ],
        )
        http_port, grpc_port, _ = ports.split()
        yield {
            "http": f"http://127.0.0.1:{http_port}",
            "grpc": f"127.0.0.1:{grpc_port}",
            "workers": workers,
        }
    finally:
        procs.stop()


def offline(ckpt: Path) -> list[list[int]]:
    llm = LLM(ckpt, engine_config=EngineConfig(num_kv_blocks=256, block_size=8))
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    return [o.token_ids for o in llm.generate(PROMPTS, params)]


@pytest.mark.slow
def test_router_lists_only_its_static_workers(static_router: dict) -> None:
    listed = httpx.get(f"{static_router['http']}/cluster/workers", timeout=10).json()["workers"]
    addresses = static_router["workers"]
    assert sorted((w["worker_id"], w["role"], w["address"], w["static"]) for w in listed) == [
        ("static-decode-1", "decode", addresses["decode"], True),
        ("static-prefill-0", "prefill", addresses["prefill"], True),
    ]


@pytest.mark.slow
def test_greedy_requests_through_static_workers_match_offline_engine(
    static_router: dict, tiny_ckpt: Path
) -> None:
    expected = offline(tiny_ckpt)
    client = openai.AsyncOpenAI(base_url=f"{static_router['http']}/v1", api_key="unused", max_retries=0)

    async def both() -> tuple[list[list[int]], list[list[int]]]:
        async with grpc.aio.insecure_channel(static_router["grpc"]) as channel:
            stub = api_pb2_grpc.K2ServeStub(channel)
            pairs = list(zip(PROMPTS, MAX_TOKENS, strict=True))
            http_out = await asyncio.gather(*(http_greedy(client, tiny_ckpt.name, p, m) for p, m in pairs))
            grpc_out = await asyncio.gather(*(grpc_greedy(stub, p, m) for p, m in pairs))
            return http_out, grpc_out

    http_out, grpc_out = asyncio.run(both())
    assert [len(t) for t in expected] == MAX_TOKENS
    assert http_out == expected
    assert grpc_out == expected


@pytest.mark.parametrize(
    "value",
    [
        "127.0.0.1:50060",  # no role
        "gpu=127.0.0.1:50060",  # unknown role
        "decode=127.0.0.1",  # no port
        "decode=:50070",  # no host
        "decode=127.0.0.1:http",  # port not a number
        "prefill=127.0.0.1:70000",  # port out of range
    ],
)
def test_malformed_worker_value_is_refused_naming_it(value: str) -> None:
    args = build_parser().parse_args(
        ["router", "--model", "unused", "--insecure-internal", "--worker", "decode=h:1", "--worker", value]
    )
    message = f"--worker {value}: expected prefill=HOST:PORT or decode=HOST:PORT"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        router_settings(args)


def test_router_cli_exits_with_an_error_naming_the_malformed_worker(tiny_ckpt: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "k2serve", "router", "--model", str(tiny_ckpt), "--port", "0"]
        + ["--grpc-port", "0", "--insecure-internal", "--worker", "decode=127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "k2serve router: error: --worker decode=127.0.0.1: expected prefill=HOST:PORT or decode=HOST:PORT"
    )
